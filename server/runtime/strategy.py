"""LoRA-aware strategies: small subclasses of Flower's Message-API strategies.

Every strategy is :class:`FedTuneStrategy` in front of one of Flower's (FedAvg,
FedProx, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg, MultiKrum). The
mixin overrides the two training hooks and leaves the aggregation math to Flower:

- ``configure_train`` sends each node the global adapter at the node's LoRA rank
  (heterogeneous ranks), only the head in a head-only round (LoRA is frozen there,
  at the value every site starts from), and records the bytes sent;
- ``aggregate_train`` counts the bytes received, decodes compressed deltas and pads
  lower-rank updates (:mod:`fedtune.common.updates`), rejects malformed or
  implausible updates (:mod:`fedtune.server.runtime.validation`),
  orders the accepted ones
  by content (so the floating-point sums do not depend on arrival order), and
  returns nothing when fewer than ``min_replies`` were accepted (the round loop
  retries). It keeps the per-round facts for the run directory in
  :attr:`round_stats`.

:meth:`FedTuneStrategy.state` / :meth:`~FedTuneStrategy.restore` carry the server
optimizer's moments (FedAdam, FedYogi, FedAdagrad) across a resume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    MultiKrum,
)

from fedtune.common import records, updates
from fedtune.common.adapters import is_adapter
from fedtune.server.runtime import decoding, resume
from fedtune.server.runtime.stats import RoundStats, count_bytes, summarize_replies

logger = logging.getLogger(__name__)
SITE_WEIGHT = "aggregation-weight"  # set on the server (federation.weighting)


def site_weight(num_examples: float, weighting: str) -> float:
    """A site's weight in the average: its ``num-examples`` (FedAvg), the square
    root of it, or 1 (``uniform``)."""
    if weighting == "uniform":
        return 1.0
    return float(float(num_examples) ** (0.5 if weighting == "sqrt" else 1.0))


def _content_key(msg: Message) -> str:
    record: Any = msg.content[records.ARRAYS]
    return updates.digest({k: v.numpy() for k, v in record.items()})


class FedTuneStrategy:
    """The fedtune hooks; put it before a Flower strategy in the bases."""

    def __init__(self, *, max_update_norm: float = 0.0, compression: str = "none",
                 min_replies: int = 1, ffa_digest: float | None = None,
                 lower_ranks: bool = False, weighting: str = "examples",
                 head_rounds: int = 0, **kwargs: object) -> None:
        if weighting != "examples":
            kwargs["weighted_by_key"] = SITE_WEIGHT
        super().__init__(**kwargs)
        self.weighting = weighting
        self.expected = decoding.Expected(
            compression=compression, lower_ranks=lower_ranks,
            max_norm=max_update_norm, ffa_digest=ffa_digest)
        self.min_replies = min_replies
        self.head_rounds = head_rounds  # rounds 1..N exchange the head only
        self.round_stats: dict[int, RoundStats] = {}
        self.train_metrics: dict[int, dict[str, float]] = {}
        self.eval_metrics: dict[int, dict[str, float]] = {}
        self.client_epsilon: dict[int, float] = {}  # central DP fills it
        self.site_labels: dict[str, str] = {}  # node id -> the operator's label

    @property
    def current(self) -> dict[str, np.ndarray]:
        """The global adapter sent in this round (empty before the first)."""
        return self.expected.current

    def configure_train(self, server_round: int, arrays: ArrayRecord,
                        config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(  # type: ignore[misc]  # mixin: Flower's
            server_round, arrays, config, grid))
        self.expected.current = {k: v.numpy() for k, v in arrays.items()}
        head_only = server_round <= self.head_rounds
        self.expected.frozen = frozenset(
            k for k in self.current if head_only and is_adapter(k))
        sent = 0
        for i, msg in enumerate(messages):
            rank = self.expected.node_ranks.get(msg.metadata.dst_node_id)
            if rank is not None or head_only:  # its ranks only; the head only
                # (Flower's messages share one RecordDict: give this one its own)
                content = RecordDict(dict(msg.content.items()))
                send = updates.truncate(self.current, rank) if rank is not None \
                    else self.current
                content[records.ARRAYS] = ArrayRecord(
                    {k: Array(v) for k, v in send.items()
                     if k not in self.expected.frozen})
                messages[i] = msg = Message(
                    content=content, message_type=msg.metadata.message_type,
                    dst_node_id=msg.metadata.dst_node_id)
            sent += records.wire_bytes(msg.content[records.ARRAYS])
        stats = RoundStats(site_by_node=dict(self.site_labels))
        stats.attempts = self.round_stats[server_round].attempts + 1 \
            if server_round in self.round_stats else 1
        self.round_stats[server_round] = stats
        stats.sampled, stats.bytes_sent = len(messages), sent
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.round_stats.setdefault(
            server_round, RoundStats(site_by_node=dict(self.site_labels)))
        replies = list(replies)
        count_bytes(replies, stats)
        replies = decoding.accept(replies, self.expected, stats)
        summarize_replies(replies, stats)
        good = sorted((m for m in replies if not m.has_error()), key=_content_key)
        stats.accepted = len(good)
        if len(good) < self.min_replies:
            logger.warning("round %d: %d update(s) accepted, %d needed "
                           "(federation.min_replies)", server_round, len(good),
                           self.min_replies)
            return None, None
        self._weigh(good, stats)
        arrays, metrics = self._combine(server_round, good)
        current = self.current
        if arrays is not None and current:
            # Flower's server optimizers step in float64: keep the adapter's dtypes
            arrays = ArrayRecord({k: Array(np.asarray(
                v.numpy(), dtype=current[k].dtype if k in current else None))
                for k, v in arrays.items()})
        if metrics is not None:
            self.train_metrics[server_round] = dict(metrics)  # type: ignore[arg-type]  # floats
        return arrays, metrics

    def _weigh(self, good: list[Message], stats: RoundStats) -> None:
        """Each accepted site's share of the average (``federation.weighting``);
        set on the server, so a site cannot choose its own weight."""
        weights = {}
        for msg in good:
            metrics: Any = msg.content[records.METRICS]
            weight = site_weight(float(metrics[records.NUM_EXAMPLES]), self.weighting)
            if self.weighting != "examples":
                metrics[SITE_WEIGHT] = weight
            weights[str(msg.metadata.src_node_id)] = weight
        total = sum(weights.values()) or 1.0
        stats.weight_by_node = {k: v / total for k, v in weights.items()}

    def _combine(self, server_round: int, good: list[Message]
                 ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The Flower strategy's aggregation of the accepted updates."""
        combined: tuple[ArrayRecord | None, MetricRecord | None] = \
            super().aggregate_train(server_round, good)  # type: ignore[misc]  # mixin
        return combined

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        metrics: MetricRecord | None = super().aggregate_evaluate(  # type: ignore[misc]  # mixin
            server_round, replies)
        if metrics is not None:
            self.eval_metrics[server_round] = {  # aggregated metrics are scalars
                k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        return metrics

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Arrays and scalars a resumed run needs to continue identically
        (:mod:`.resume`); plain averaging keeps none."""
        return {}, {}

    def restore(self, arrays: Mapping[str, np.ndarray],
                scalars: Mapping[str, float]) -> None:
        """Inverse of :meth:`state`."""


class _ServerOptimizerState(FedTuneStrategy):
    """FedOpt's moments ``m_t`` / ``v_t`` (FedAdam, FedYogi, FedAdagrad)."""

    m_t: dict[str, np.ndarray] | None
    v_t: dict[str, np.ndarray] | None

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        return {**resume.pack("m_t", self.m_t or {}),
                **resume.pack("v_t", self.v_t or {})}, {}

    def restore(self, arrays: Mapping[str, np.ndarray],
                scalars: Mapping[str, float]) -> None:
        self.m_t = resume.unpack("m_t", arrays) or self.m_t
        self.v_t = resume.unpack("v_t", arrays) or self.v_t


class FedTuneAvg(FedTuneStrategy, FedAvg):
    """FedAvg (weighted by ``num-examples``)."""


class FedTuneAvgM(FedTuneStrategy, FedAvgM):
    """FedAvg, applied with server-side momentum (Hsu et al. 2019): the momentum
    averages the sites' DP noise over rounds while the signal adds up."""

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        vector = self.momentum_vector or []
        return resume.pack("momentum", {f"{i:06d}": np.asarray(v)
                                        for i, v in enumerate(vector)}), {}

    def restore(self, arrays: Mapping[str, np.ndarray],
                scalars: Mapping[str, float]) -> None:
        saved = resume.unpack("momentum", arrays)
        if saved:
            self.momentum_vector = [saved[k] for k in sorted(saved)]


class FedTuneProx(FedTuneStrategy, FedProx):
    """FedAvg; the sites add the proximal step (``proximal-mu`` in the config)."""


class FedTuneAdam(_ServerOptimizerState, FedAdam):
    """FedAvg of the updates, applied with a server-side Adam step."""


class FedTuneYogi(_ServerOptimizerState, FedYogi):
    """FedAvg of the updates, applied with a server-side Yogi step."""


class FedTuneAdagrad(_ServerOptimizerState, FedAdagrad):
    """FedAvg of the updates, applied with a server-side Adagrad step."""


class FedTuneMedian(FedTuneStrategy, FedMedian):
    """Coordinate-wise median of the accepted updates."""


class FedTuneTrimmedAvg(FedTuneStrategy, FedTrimmedAvg):
    """Coordinate-wise mean after cutting ``beta`` of the values at each end."""


class FedTuneKrum(FedTuneStrategy, MultiKrum):
    """(Multi-)Krum: average the ``select`` update(s) closest to their neighbours
    (``select=0``: all but ``num_malicious_nodes`` of those that arrived)."""

    def __init__(self, *, select: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]  # Flower's keywords
        self.select = select

    def _combine(self, server_round: int, good: list[Message]
                 ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.num_nodes_to_select = self.select or max(
            1, len(good) - self.num_malicious_nodes)
        return super()._combine(server_round, good)
