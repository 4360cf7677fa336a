"""The run directory: every file name in it and the ``round-NNNN`` naming. Every
other module (the runtime that writes it, the tools that read it after the run,
the simulation driver and its console) asks here; nothing else types these names.

```
RUN_DIR/
  config.yaml                    resolved run config
  metrics.jsonl                  one JSON object per round
  plan.json                      every site's privacy-utility plan (before round 1)
  checkpoints/round-0001/        PEFT format: adapter_config.json +
                                 adapter_model.safetensors (+ fedtune_model.json)
  final -> checkpoints/round-N   (a copy where symlinks are unavailable)
  best -> checkpoints/round-K    the best round by federation.selection_metric
  state.npz                      resume state after the last completed round
  personalization.json           global vs personalised adapters, per site
  tensorboard/                   event files (train.tensorboard)
  logs/run.log, logs/sites.log   a simulation's full logs
  report/index.html              `fedtune report`'s page (+ its PNG figures)
```

Imports nothing but the standard library: the console and the operator's daemon
read it without loading torch.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedtune.common.errors import FedtuneError

RUNS_DIR_ENV = "FEDTUNE_RUNS_DIR"  # set by `fedtune server`: where runs are written
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
PLAN_FILE = "plan.json"  # every site's privacy-utility plan
CHECKPOINTS = "checkpoints"
FINAL = "final"
BEST = "best"
STATE = "state.npz"
PERSONALISATION = "personalization.json"
TENSORBOARD = "tensorboard"
LOG_DIR = "logs"  # a simulation's logs: what its terminal does not show
RUN_LOG = "run.log"  # every line of the driver: fedtune's details, Flower's INFO
SITES_LOG = "sites.log"  # the site actors' output
REPORT_DIR = "report"
REPORT_PAGE = "index.html"
_ROUND = "round-"


def new_run_dir(base: str | Path, name: str) -> Path:
    """Create ``base/<name>-<UTC timestamp>`` (never reusing an existing one)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = Path(base) / f"{name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(base) / f"{name}-{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run's resolved config."""
    return (path / CONFIG).is_file()


def checkpoint_dir(run_dir: Path, server_round: int) -> Path:
    return run_dir / CHECKPOINTS / f"{_ROUND}{server_round:04d}"


def is_round_dir(path: Path) -> bool:
    """Whether ``path`` is named like a ``checkpoints/round-NNNN`` directory."""
    return path.name.startswith(_ROUND) and path.name.removeprefix(_ROUND).isdigit()


def round_of(path: Path) -> int:
    """The round a ``checkpoints/round-NNNN`` directory holds."""
    if not is_round_dir(path):
        raise FedtuneError(f"{path}: not a round checkpoint (checkpoints/round-NNNN)")
    return int(path.name.removeprefix(_ROUND))


def round_dirs(run_dir: Path) -> list[Path]:
    """The ``checkpoints/round-NNNN`` directories, in round order."""
    ckpts = run_dir / CHECKPOINTS
    found = [d for d in ckpts.glob(_ROUND + "*") if d.is_dir() and is_round_dir(d)
             ] if ckpts.is_dir() else []
    return sorted(found, key=round_of)


def saved_rounds(run_dir: Path) -> list[int]:
    """The rounds with a checkpoint directory, in order."""
    return [round_of(d) for d in round_dirs(run_dir)]


def unfinished_rounds(run_dir: Path, *, after: int) -> list[Path]:
    """Round directories a crashed run left: half-written ones (``.tmp``) and
    those of rounds after ``after`` (they are redone on resume)."""
    ckpts = run_dir / CHECKPOINTS
    out = []
    for d in ckpts.glob(_ROUND + "*") if ckpts.is_dir() else []:
        tail = d.name.removeprefix(_ROUND).removesuffix(".tmp")
        if d.name.endswith(".tmp") or (tail.isdigit() and int(tail) > after):
            out.append(d)
    return out
