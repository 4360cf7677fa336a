"""Writing the run directory (:mod:`fedtune.server.rundir` names its files): the
resolved config, per-round adapter checkpoints, ``metrics.jsonl``, the resume state.

Files are written to a temporary name and renamed, so a crash never leaves a
half-written checkpoint or metrics line behind.

``state.npz`` is what ``--resume`` continues from: the global adapter (exact fp32),
the strategy's state (e.g. FedAdam's moments), the round number, Python's RNG state
(Flower samples nodes with it) and the resolved config. It is written after the
round's checkpoint and metrics line; a crash in between leaves the previous state, and
the resumed run redoes that round (its metrics line and checkpoint are replaced).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.common import assets, records
from fedtune.common.config import RunConfig, dump_yaml, to_dict
from fedtune.common.errors import FedtuneError
from fedtune.server import rundir

logger = logging.getLogger(__name__)

STATE_FORMAT = "fedtune-server-state/1"


def write_config(run_dir: Path, cfg: RunConfig) -> Path:
    out = run_dir / rundir.CONFIG
    _atomic_write(out, dump_yaml(cfg))
    return out


def damage(adapter_dir: Path) -> str:
    """Why a saved adapter cannot be trusted ("" when it is whole): its tensors
    file is missing or differs from the sha256 recorded when it was saved."""
    from fedtune.common.model import (  # torch: only where an adapter is read
        ADAPTER_FILE,
        ADAPTER_SHA256,
        FEDTUNE_META,
    )

    path = adapter_dir / ADAPTER_FILE
    if not path.is_file():
        return f"{ADAPTER_FILE} is missing"
    try:
        meta = json.loads((adapter_dir / FEDTUNE_META).read_text())
    except (OSError, ValueError):
        meta = {}
    recorded = meta.get(ADAPTER_SHA256) if isinstance(meta, dict) else None
    if recorded is None:
        return ""  # saved before checksums: only loading it can tell
    now = assets.file_sha256(path)
    if now != recorded:
        return (f"its sha256 {now[:12]}... differs from the {recorded[:12]}... "
                "recorded when it was saved (truncated or overwritten on disk)")
    return ""


def whole_rounds(run_dir: Path) -> list[int]:
    """The saved rounds whose adapters still check out."""
    return [r for r in rundir.saved_rounds(run_dir)
            if not damage(rundir.checkpoint_dir(run_dir, r))]


def corrupt_checkpoint(run_dir: Path | None, adapter_dir: Path, server_round: int,
                       why: str) -> FedtuneError:
    """One line: the file, the round, and the saved rounds that still load."""
    from fedtune.common.model import ADAPTER_FILE

    where = (f"{adapter_dir / ADAPTER_FILE}: round {server_round}'s "
             f"checkpoint is corrupt ({why})")
    if run_dir is None:
        return FedtuneError(f"{where}; export it again from its run directory")
    whole = [r for r in whole_rounds(run_dir) if r != server_round]
    return FedtuneError(
        f"{where}; the saved rounds that still load: "
        + (", ".join(map(str, whole)) + f" (pass --round {whole[-1]})" if whole
           else "none"))


def publish(run_dir: Path, server_round: int, *, name: str = rundir.FINAL) -> None:
    """Point ``RUN_DIR/final`` (or ``best``) at a round's checkpoint."""
    final = run_dir / name
    target = rundir.checkpoint_dir(run_dir, server_round)
    tmp = run_dir / f".{name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink() if tmp.is_symlink() else shutil.rmtree(tmp)
    try:
        tmp.symlink_to(target.relative_to(run_dir), target_is_directory=True)
    except OSError:
        shutil.copytree(target, tmp)
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(tmp, final)


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Append one round's line to ``metrics.jsonl`` (flushed and fsynced)."""
    with open(run_dir / rundir.METRICS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, allow_nan=False, default=float) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def amend_metrics(run_dir: Path, server_round: int, fields: dict[str, Any]) -> None:
    """Add ``fields`` to round ``server_round``'s line of ``metrics.jsonl`` (its
    last one), rewriting the file atomically; every other line stays as it was."""
    path = run_dir / rundir.METRICS
    lines = path.read_text(encoding="utf-8").splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip() and json.loads(lines[i]).get("round") == server_round:
            row = {**json.loads(lines[i]), **fields}
            lines[i] = json.dumps(row, allow_nan=False, default=float)
            break
    else:
        raise FedtuneError(f"{path}: no line for round {server_round} to amend")
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fold_epsilons(run_dir: Path, replies: Mapping[str, Mapping[str, Any]], *,
                  release: str) -> float | None:
    """After a release outside the rounds (the decision calibration, a
    personalisation): each replying site's epsilons (this run's and its ledger's
    total, both from :class:`fedtune.client.releases.Releases`) into the last line
    of ``metrics.jsonl``, so that the summary, the report and ``fedtune status``
    show what the sites' ledgers hold. Returns the run's new max epsilon."""
    found = {str(n): (float(m[records.EPSILON]),
                      float(m.get(records.EPSILON_TOTAL, m[records.EPSILON])))
             for n, m in replies.items() if records.EPSILON in m}
    rows = read_metrics(run_dir)
    if not found or not rows:
        return None
    last = rows[-1]
    eps = dict(last.get("epsilon_by_node") or {})
    total = dict(last.get("epsilon_total_by_node") or {})
    for node, (run_eps, ledger_eps) in found.items():
        eps[node], total[node] = run_eps, ledger_eps
    top = float(max([*eps.values(), float(last.get("epsilon_max") or 0.0)]))
    amend_metrics(run_dir, int(last["round"]), {
        "epsilon_by_node": eps, "epsilon_total_by_node": total,
        "epsilon_max": top, "epsilon_mean": sum(eps.values()) / len(eps),
        "epsilon_releases": sorted({*last.get("epsilon_releases", ["round"]),
                                    release})})
    logger.info("privacy after the %s: epsilon max %.3f over the run's sites "
                "(the sites' ledgers hold the same)", release, top)
    return top


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` ([] when there is none); a damaged line is a
    FedtuneError naming ``metrics.jsonl:N``."""
    path = Path(run_dir) / rundir.METRICS
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise FedtuneError(f"{path}:{n}: not a JSON line ({err.msg}); the file "
                               "is damaged: remove that line and try again") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise FedtuneError(f"{path}:{n}: not a fedtune metrics line (no integer "
                               "'round')")
        rows.append(row)
    return rows


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class ServerState:
    """Everything a resumed run needs (see the module docstring)."""

    round: int
    arrays: dict[str, np.ndarray]
    strategy_arrays: dict[str, np.ndarray]
    strategy_scalars: dict[str, float]
    python_rng: Any
    config: dict[str, Any]


def save_state(run_dir: Path, state: ServerState) -> Path:
    """Write ``state.npz`` atomically (temp file, fsync, rename, fsync dir)."""
    meta = {"format": STATE_FORMAT, "round": state.round,
            "strategy_scalars": state.strategy_scalars,
            "python_rng": state.python_rng, "config": state.config}
    payload = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
               **{f"global/{k}": v for k, v in state.arrays.items()},
               **{f"strategy/{k}": v for k, v in state.strategy_arrays.items()}}
    buf = io.BytesIO()
    np.savez(buf, **payload)  # type: ignore[arg-type]  # numpy's stub is too narrow
    out = run_dir / rundir.STATE
    tmp = run_dir / (rundir.STATE + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return out


def load_state(run_dir: Path) -> ServerState:
    """Read ``state.npz``; a missing or damaged file names the problem."""
    path = run_dir / rundir.STATE
    if not path.is_file():
        raise FedtuneError(f"{path}: no resume state. Is {run_dir} a fedtune run "
                           "directory that completed at least one round?")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            arrays = {k.split("/", 1)[1]: z[k] for k in z.files
                      if k.startswith("global/")}
            strat = {k.split("/", 1)[1]: z[k] for k in z.files
                     if k.startswith("strategy/")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise FedtuneError(f"{path}: damaged resume state ({err}); the checkpoints "
                           "under checkpoints/ are intact, start a new run from "
                           "one of them") from err
    if meta.get("format") != STATE_FORMAT:
        raise FedtuneError(f"{path}: format {meta.get('format')!r}, expected "
                           f"{STATE_FORMAT!r}")
    return ServerState(round=int(meta["round"]), arrays=arrays, strategy_arrays=strat,
                       strategy_scalars=dict(meta["strategy_scalars"]),
                       python_rng=meta["python_rng"], config=meta["config"])


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as it is stored in the state (JSON types)."""
    stored: dict[str, Any] = json.loads(json.dumps(to_dict(cfg)))
    return stored


def rewind(run_dir: Path, last_round: int) -> None:
    """Forget what a crashed run wrote after ``last_round``: metrics lines and
    checkpoints of later rounds (they are redone on resume)."""
    rows = [r for r in read_metrics(run_dir) if int(r.get("round", 0)) <= last_round]
    _atomic_write(run_dir / rundir.METRICS,
                  "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    for d in rundir.unfinished_rounds(run_dir, after=last_round):
        shutil.rmtree(d)
    if last_round > 0:
        publish(run_dir, last_round)
    best = next((int(r["best_round"]) for r in reversed(rows)
                 if r.get("best_round")), 0)
    if best:
        publish(run_dir, best, name="best")
    elif (run_dir / rundir.BEST).is_symlink():
        (run_dir / rundir.BEST).unlink()


def check_resumable(saved: Mapping[str, Any], cfg: RunConfig, run_dir: Path) -> None:
    """The resumed run must use the config the state was saved with."""
    now = config_dict(cfg)
    diff = sorted(f"{sec}.{k}" for sec in now for k in now[sec]
                  if saved.get(sec, {}).get(k) != now[sec][k])
    if diff:
        raise FedtuneError(f"{run_dir}: the config differs from the one the run "
                           f"started with ({', '.join(diff[:8])}); resume with the "
                           "run directory's own config.yaml")
