"""A run directory read for the after-run tools (``fedtune report``, ``fedtune
compare``): its config, its per-round metrics and its personalisation round, and
the few figures every view of it formats the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common import config
from fedtune.common.errors import FedtuneError
from fedtune.server import rundir
from fedtune.server.runtime import checkpoint

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Run:
    """A run directory's config and per-round metrics."""

    path: Path
    cfg: config.RunConfig
    initial: Row | None  # round 0: the adapter before training
    rows: list[Row]  # rounds 1.. in order
    personal: Row | None = None  # the personalisation round (personalization.json)


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; a missing or damaged file is a FedtuneError that says
    what to pass instead."""
    path = Path(run_dir)
    metrics, cfg_file = path / rundir.METRICS, path / rundir.CONFIG
    for f in (cfg_file, metrics):
        if not f.is_file():
            raise FedtuneError(f"{f}: not found; `fedtune report` takes a run "
                               "directory written by `fedtune simulate` or `fedtune "
                               "run` (it holds config.yaml and metrics.jsonl)")
    rows = checkpoint.read_metrics(path)
    initial = next((r for r in rows if r["round"] == 0), None)
    personal_file = path / rundir.PERSONALISATION
    return Run(path=path, cfg=config.load(cfg_file), initial=initial,
               rows=sorted((r for r in rows if r["round"] > 0),
                           key=lambda r: r["round"]),
               personal=json.loads(personal_file.read_text())
               if personal_file.is_file() else None)


def fig(value: Any, fmt: str = ".4f") -> str:
    """A metric as the tables print it ("-" when absent or not finite)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def mb(value: Any) -> str:
    """Bytes as MB with two decimals ("-" when absent)."""
    return "-" if value is None else f"{value / 1e6:.2f}"


def best_round(run: Run) -> int:
    """The run's best round so far (0: none recorded)."""
    return int(run.rows[-1].get("best_round") or 0) if run.rows else 0


def calibration(run: Run) -> Mapping[str, Any] | None:
    """The decision calibration the run recorded (on its best or final round)."""
    return next((r["calibration"] for r in reversed(run.rows)
                 if r.get("calibration")), None)
