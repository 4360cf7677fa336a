"""Best-round selection and server-side early stopping on the central eval metric.

After every round the recorder hands the round's central evaluation to a
:class:`Selection`; it keeps the best round so far (``best -> checkpoints/round-K``
beside ``final``) and says when ``federation.round_patience`` rounds in a
row failed to improve the metric by more than ``federation.min_delta``. Round 0
(the adapter before training) is no candidate: it has no checkpoint.

Its state is a function of ``metrics.jsonl``: a resumed run rebuilds it with
:meth:`Selection.replay` from the rows the run already wrote, so ``state.npz``
carries nothing for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedtune.common.config import RunConfig
from fedtune.common.errors import FedtuneError

logger = logging.getLogger(__name__)

# selection metric -> (metrics.jsonl key, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "loss": ("eval_loss", False),
    "perplexity": ("eval_perplexity", False),
    "macro-f1": ("eval_macro_f1", True),
    "accuracy": ("eval_accuracy", True),
}
STOPPED = "stopped_early"  # metrics.jsonl key of the round that ended the run


@dataclass
class Selection:
    """The best round so far and the early-stopping count.

    Parameters
    ----------
    metric : str
        A key of :data:`METRICS` (``federation.selection_metric`` resolved).
    patience : int
        Rounds without improvement that stop the run (0: never stop early).
    min_delta : float
        The least change that counts as an improvement.
    """

    metric: str
    patience: int = 0
    min_delta: float = 0.0
    best_round: int = 0  # 0: no round evaluated yet
    best_value: float | None = None
    stale: int = 0  # rounds since the best one
    stopped_at: int = 0  # the round that stopped the run early (0: none)

    @classmethod
    def for_run(cls, cfg: RunConfig) -> Selection:
        fed = cfg.federation
        return cls(metric=cfg.selection_metric,
                   patience=fed.round_patience, min_delta=fed.min_delta)

    @property
    def key(self) -> str:
        return METRICS[self.metric][0]

    @property
    def should_stop(self) -> bool:
        return self.stopped_at > 0

    def improves(self, value: float) -> bool:
        if self.best_value is None:
            return True
        higher = METRICS[self.metric][1]
        gain = value - self.best_value if higher else self.best_value - value
        return gain > self.min_delta

    def update(self, server_round: int, row: Mapping[str, Any]) -> bool:
        """Account round ``server_round`` (its metrics line); True when it is the
        new best. A round without a finite metric counts as no improvement."""
        if server_round <= 0:
            return False
        value = row.get(self.key)
        if isinstance(value, int | float) and math.isfinite(value) and \
                self.improves(float(value)):
            self.best_round, self.best_value = server_round, float(value)
            self.stale = 0
            return True
        self.stale += 1
        if self.patience and self.best_round and self.stale >= self.patience:
            self.stopped_at = server_round
        return False

    def fields(self) -> dict[str, Any]:
        """What a metrics line records about the selection."""
        out: dict[str, Any] = {"selection_metric": self.metric,
                               "best_round": self.best_round or None,
                               "best_value": self.best_value,
                               "rounds_without_improvement": self.stale}
        if self.stopped_at:
            out[STOPPED] = self.reason()
        return out

    def reason(self) -> str:
        return (f"no {self.metric} improvement above min_delta {self.min_delta:g} in "
                f"{self.stale} round(s) (federation.round_patience="
                f"{self.patience}); best round {self.best_round} "
                f"({self.metric} {self.best_value:.4g})")

    def replay(self, rows: Iterable[Mapping[str, Any]], *,
               past_stop: bool = False) -> None:
        """Rebuild the state from a run's metrics lines (resume; round 0 counts
        for nothing). A run that stopped early is refused unless ``past_stop``;
        then the patience count starts afresh."""
        for row in sorted(rows, key=lambda r: int(r["round"])):
            self.update(int(row["round"]), row)
            if row.get(STOPPED):
                self.stopped_at = int(row["round"])
        if self.stopped_at and not past_stop:
            raise FedtuneError(
                f"this run stopped early after round {self.stopped_at}: "
                f"{self.reason()}. Its best adapter is RUN_DIR/best. To train on "
                "anyway, resume with --past-early-stop (the patience count then "
                "starts afresh)")
        if self.stopped_at:
            logger.warning("resuming past the early stop of round %d (asked with "
                           "--past-early-stop)", self.stopped_at)
            self.stopped_at, self.stale = 0, 0
