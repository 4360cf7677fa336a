"""The run directory: resolved config, per-round adapter checkpoints, metrics.jsonl.

```
RUN_DIR/
  config.yaml                    resolved run config
  metrics.jsonl                  one JSON object per round
  checkpoints/round-0001/        PEFT format: adapter_config.json +
                                 adapter_model.safetensors (+ fedtune_model.json)
  final -> checkpoints/round-N   (a copy where symlinks are unavailable)
```
Files are written to a temporary name and renamed, so a crash never leaves a
half-written checkpoint or metrics line behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fedtune.common.config import RunConfig, dump_yaml


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


def write_config(run_dir: Path, cfg: RunConfig) -> Path:
    out = run_dir / "config.yaml"
    _atomic_write(out, dump_yaml(cfg))
    return out


def checkpoint_dir(run_dir: Path, server_round: int) -> Path:
    return run_dir / "checkpoints" / f"round-{server_round:04d}"


def publish_final(run_dir: Path, server_round: int) -> None:
    """Point ``final`` at the last completed round's checkpoint."""
    final = run_dir / "final"
    target = checkpoint_dir(run_dir, server_round)
    tmp = run_dir / ".final.tmp"
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
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, allow_nan=False, default=float) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
