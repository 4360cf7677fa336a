from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.simulations import cli


def test_config_prints_resolved_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "federation.num-rounds=6"]) == 0
    out = capsys.readouterr().out
    assert "num_rounds: 6" in out and "name_or_path: fedtune:all-MiniLM-L6-v2" in out


def test_bad_config_exits_2_and_names_every_key(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: -1\n  lr: 3\n")
    assert cli.main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: must be >= 0" in err and "train.lr: unknown key" in err


def test_wrong_model_fails_before_the_engine_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    code = cli.main(["simulate", f"model.name-or-path={tmp_path / 'no-model'}",
                     "--run-dir", str(run_dir)])
    assert code == 2
    assert "cannot load" in capsys.readouterr().err
    assert not run_dir.exists()  # nothing half-written


def test_unknown_asset_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["assets", "gpt-5"]) == 2
    assert "unknown embedded asset 'fedtune:gpt-5'" in capsys.readouterr().err
