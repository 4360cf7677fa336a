"""Per-round metrics as TensorBoard event files, when ``tensorboard`` is installed.

``pip install 'fedtune[tensorboard]'`` and every run also writes
``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR/tensorboard``). Without the
package nothing is written and nothing fails: metrics.jsonl and ``fedtune report``
hold the same figures.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.server import rundir

logger = logging.getLogger(__name__)

# metrics.jsonl key -> TensorBoard tag (scalars; dict-valued keys are per node)
GROUPS = {"eval_": "eval/", "train_loss": "train/loss",
          "epsilon_": "privacy/epsilon_", "bytes_": "communication/",
          "adapter_payload_bytes":
          "communication/adapter_payload_bytes", "clients_": "sites/",
          "round_seconds": "time/round_seconds", "eval_seconds": "time/eval_seconds",
          "client_train_seconds_sum": "time/client_train_seconds_sum"}
PER_NODE = {"epsilon_by_node": "privacy/epsilon_by_node",
            "epsilon_total_by_node": "privacy/epsilon_total_by_node"}


def tag(key: str) -> str | None:
    """The TensorBoard tag of a metrics.jsonl key (None: not logged)."""
    for prefix, group in GROUPS.items():
        if key == prefix:
            return group
        if key.startswith(prefix) and prefix.endswith("_"):
            return group + key[len(prefix):]
    return None


class EventLog:
    """Writes each metrics row as scalars at step = round; a no-op without
    ``tensorboard``."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional extra is not installed
            self.writer = None
            return
        self.writer = SummaryWriter(log_dir=str(run_dir / rundir.TENSORBOARD))
        logger.info("TensorBoard event files: %s", run_dir / rundir.TENSORBOARD)

    def write(self, row: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(row["round"])
        for key, value in row.items():
            name = tag(key)
            if name and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(name, float(value), step)
            elif key in PER_NODE and isinstance(value, Mapping):
                for node, v in value.items():
                    if isinstance(v, int | float):
                        self.writer.add_scalar(f"{PER_NODE[key]}/{node}", float(v),
                                               step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
