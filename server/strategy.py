"""LoRA-aware strategies: small subclasses of Flower's Message-API strategies.

Every strategy is :class:`FedTuneStrategy` in front of one of Flower's (FedAvg,
FedProx, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg, MultiKrum). The
mixin overrides the two training hooks and leaves the aggregation math to Flower:

- ``configure_train`` sends each node the global adapter at the node's LoRA rank
  (heterogeneous ranks) and records the bytes sent;
- ``aggregate_train`` counts the bytes received, decodes compressed deltas and pads
  lower-rank updates (:mod:`fedtune.common.updates`), rejects malformed or
  implausible updates (:mod:`fedtune.server.validation`), orders the accepted ones
  by content (so the floating-point sums do not depend on arrival order), and
  returns nothing when fewer than ``min_replies`` were accepted (the round loop
  retries). It keeps the per-round facts for the run directory in
  :attr:`round_stats`.

:meth:`FedTuneStrategy.state` / :meth:`~FedTuneStrategy.restore` carry the server
optimizer's moments (FedAdam, FedYogi, FedAdagrad) across a resume.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
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

from fedtune.common import planning, records, updates
from fedtune.common.config import FederationConfig, PrivacyConfig
from fedtune.common.errors import FedtuneError
from fedtune.server import validation

logger = logging.getLogger(__name__)
DECLINED = "PrivacyBudgetExhausted"  # in a site's error reply: it declined the round
SITE_WEIGHT = "aggregation-weight"  # set on the server (federation.weighting)


def site_weight(num_examples: float, weighting: str) -> float:
    """A site's weight in the average: its ``num-examples`` (FedAvg), the square
    root of it, or 1 (``uniform``)."""
    if weighting == "uniform":
        return 1.0
    return float(num_examples) ** (0.5 if weighting == "sqrt" else 1.0)


@dataclass
class RoundStats:
    """What one training round moved and spent."""

    sampled: int = 0
    replied: int = 0
    failed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    payload_bytes: int = 0
    epsilons: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    non_private: int = 0
    epsilon_by_node: dict[str, float] = field(default_factory=dict)
    nodes_replied: list[str] = field(default_factory=list)
    nodes_failed: list[str] = field(default_factory=list)
    nodes_declined: list[str] = field(default_factory=list)
    nodes_rejected: dict[str, str] = field(default_factory=dict)
    epsilon_total_by_node: dict[str, float] = field(default_factory=dict)
    accepted: int = 0
    attempts: int = 1
    weight_by_node: dict[str, float] = field(default_factory=dict)
    dp_by_node: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        eps = self.epsilons
        return {
            "clients_sampled": self.sampled, "clients_replied": self.replied,
            "clients_failed": self.failed, "clients_non_private": self.non_private,
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
            "adapter_payload_bytes": self.payload_bytes,
            "epsilon_max": max(eps) if eps else None,
            "epsilon_mean": statistics.fmean(eps) if eps else None,
            "client_train_seconds_sum": sum(self.train_seconds),
            "epsilon_by_node": dict(self.epsilon_by_node),
            "nodes_replied": list(self.nodes_replied),
            "nodes_failed": list(self.nodes_failed),
            "clients_declined": len(self.nodes_declined),
            "nodes_declined": list(self.nodes_declined),
            "epsilon_total_by_node": dict(self.epsilon_total_by_node),
            "clients_rejected": len(self.nodes_rejected),
            "nodes_rejected": dict(self.nodes_rejected),
            "clients_late": max(0, self.sampled - self.replied - self.failed
                                - len(self.nodes_rejected)),
            "round_attempts": self.attempts,
            "weight_by_node": dict(self.weight_by_node),
            "dp_by_node": {k: dict(v) for k, v in self.dp_by_node.items()},
            "rho_max": max((v["rho"] for v in self.dp_by_node.values()),
                           default=None),
        }


def all_declined(server_round: int, sites: int) -> FedtuneError:
    """The error that stops a run whose round every site declined."""
    return FedtuneError(f"round {server_round}: every site declined ({sites}): their "
                        "privacy budgets are exhausted for this data. The run stops; "
                        "checkpoints of earlier rounds are kept.")


def summarize_replies(replies: list[Message], stats: RoundStats) -> None:
    """Fill ``stats`` from the training replies (errors counted, not raised; bytes
    are counted by :func:`count_bytes`, before decoding)."""
    for msg in replies:
        node = str(msg.metadata.src_node_id)
        if msg.has_error():
            stats.failed += 1
            if DECLINED in (msg.error.reason or ""):
                stats.nodes_declined.append(node)
                logger.warning("node %s declined the round: its privacy budget is "
                               "exhausted", node)
            else:
                stats.nodes_failed.append(node)
            continue
        stats.replied += 1
        stats.nodes_replied.append(node)
        record_site_metrics(stats, node, dict(
            msg.content.metric_records.get(records.METRICS, MetricRecord())))


def count_bytes(replies: list[Message], stats: RoundStats) -> None:
    """Bytes of every update that arrived, as sent (compressed, any rank)."""
    for msg in replies:
        if msg.has_error():
            continue
        arrays = msg.content.array_records.get(records.ARRAYS)
        if arrays is not None:
            stats.bytes_received += records.wire_bytes(arrays)
            stats.payload_bytes = max(stats.payload_bytes,
                                      records.payload_bytes(arrays))


def record_site_metrics(stats: RoundStats, node: str, m: Mapping[str, Any]) -> None:
    """A replying site's epsilons and training time (no epsilon = not private)."""
    if records.EPSILON in m:
        eps = float(m[records.EPSILON])
        stats.epsilons.append(eps)
        stats.epsilon_by_node[node] = eps
        stats.epsilon_total_by_node[node] = float(m.get(records.EPSILON_TOTAL, eps))
    else:
        stats.non_private += 1
    if records.TRAIN_SECONDS in m:
        stats.train_seconds.append(float(m[records.TRAIN_SECONDS]))
    dp_keys = (records.NOISE_MULTIPLIER, records.SAMPLE_RATE, records.DP_STEPS,
               records.TRAINABLE_PARAMS, records.NUM_EXAMPLES)
    if all(k in m for k in dp_keys):
        sigma, q, steps, dims, n = (float(m[k]) for k in dp_keys)
        stats.dp_by_node[node] = {
            "records": n, "sigma": sigma, "sample_rate": q, "steps": steps,
            "dims": dims, "rho": planning.round_noise_ratio(
                sigma=sigma, dims=int(dims), batch=q * n, steps=int(steps))}


def _content_key(msg: Message) -> str:
    record: Any = msg.content[records.ARRAYS]
    return updates.digest({k: v.numpy() for k, v in record.items()})


class FedTuneStrategy:
    """The fedtune hooks; put it before a Flower strategy in the bases."""

    STATE_ATTRS = ("m_t", "v_t")  # FedOpt's moments, where the strategy has them

    def __init__(self, *, max_update_norm: float = 0.0, compression: str = "none",
                 min_replies: int = 1, ffa_digest: float | None = None,
                 lower_ranks: bool = False, weighting: str = "examples",
                 **kwargs: object) -> None:
        if weighting != "examples":
            kwargs["weighted_by_key"] = SITE_WEIGHT
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.weighting = weighting
        self.max_update_norm, self.compression = max_update_norm, compression
        self.lower_ranks = lower_ranks  # accept lower-rank updates (HetLoRA)
        self.min_replies, self.ffa_digest = min_replies, ffa_digest
        self._global: dict[str, np.ndarray] = {}
        self.node_ranks: dict[int, int] = {}
        self.round_stats: dict[int, RoundStats] = {}
        self.train_metrics: dict[int, dict[str, float]] = {}
        self.eval_metrics: dict[int, dict[str, float]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord,
                        config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(  # type: ignore[misc]
            server_round, arrays, config, grid))
        self._global = {k: v.numpy() for k, v in arrays.items()}
        sent = 0
        for i, msg in enumerate(messages):
            rank = self.node_ranks.get(msg.metadata.dst_node_id)
            if rank is not None:  # learnt from its last reply: send only its ranks
                # (Flower's messages share one RecordDict: give this one its own)
                content = RecordDict(dict(msg.content.items()))
                content[records.ARRAYS] = ArrayRecord(
                    {k: Array(v) for k, v in updates.truncate(self._global,
                                                              rank).items()})
                messages[i] = msg = Message(
                    content=content, message_type=msg.metadata.message_type,
                    dst_node_id=msg.metadata.dst_node_id)
            sent += records.wire_bytes(msg.content[records.ARRAYS])  # type: ignore
        stats = RoundStats()
        stats.attempts = self.round_stats[server_round].attempts + 1 \
            if server_round in self.round_stats else 1
        self.round_stats[server_round] = stats
        stats.sampled, stats.bytes_sent = len(messages), sent
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.round_stats.setdefault(server_round, RoundStats())
        replies = list(replies)
        count_bytes(replies, stats)
        replies = self._valid(replies, stats)
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
        if arrays is not None and self._global:
            # Flower's server optimizers step in float64: keep the adapter's dtypes
            arrays = ArrayRecord({k: Array(np.asarray(
                v.numpy(), dtype=self._global[k].dtype if k in self._global else None))
                for k, v in arrays.items()})
        if metrics is not None:
            self.train_metrics[server_round] = dict(metrics)  # type: ignore[arg-type]
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
        return super().aggregate_train(server_round, good)  # type: ignore[misc]

    def _valid(self, replies: list[Message], stats: RoundStats) -> list[Message]:
        """Decode each update in place; drop (and log, with the node id) those that
        must not be aggregated."""
        ok = [m for m in replies if not m.has_error()]
        keys = validation.usual_keys([frozenset(m.content.metric_records.get(
            records.METRICS, MetricRecord())) for m in ok])
        kept = [m for m in replies if m.has_error()]
        for msg in ok:
            reason = self._reason(msg, keys)
            if reason is None:
                kept.append(msg)
            else:
                node = str(msg.metadata.src_node_id)
                stats.nodes_rejected[node] = reason
                logger.warning("rejected the update of node %s: %s", node, reason)
        return kept

    def _reason(self, msg: Message, keys: frozenset[str]) -> str | None:
        content = msg.content
        if set(content.array_records) != {records.ARRAYS} or \
                set(content.metric_records) != {records.METRICS}:
            return (f"records {sorted(content.array_records)} + "
                    f"{sorted(content.metric_records)}; expected one ArrayRecord "
                    f"{records.ARRAYS!r} and one MetricRecord {records.METRICS!r}")
        metrics = dict(content[records.METRICS])  # type: ignore[arg-type]
        problem = validation.check_metrics(metrics, keys)
        if problem or not self._global:
            return problem
        if self.ffa_digest is not None and \
                metrics.get(records.LORA_A_DIGEST) != self.ffa_digest:
            return ("its frozen LoRA A differs from the server's (FFA-LoRA needs "
                    "the same train.seed, model and peft version on every site)")
        sent = {k: v.numpy() for k, v in content[records.ARRAYS].items()}  # type: ignore
        try:
            update = updates.decode(sent, self._global, self.compression)
            if self.lower_ranks:
                update = updates.pad(update, self._global)
        except updates.UpdateError as err:
            return str(err)
        problem = validation.check_arrays(update, self._global,
                                          max_norm=self.max_update_norm)
        if problem is None:
            rank = updates.site_rank(sent) if self.lower_ranks else None
            if rank is not None and rank < (updates.site_rank(self._global) or 0):
                self.node_ranks[msg.metadata.src_node_id] = rank
            content[records.ARRAYS] = ArrayRecord(
                {k: Array(np.asarray(v, np.float32)) for k, v in update.items()})
        return problem

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore
        if metrics is not None:
            self.eval_metrics[server_round] = dict(metrics)
        return metrics  # type: ignore[no-any-return]

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Arrays and scalars a resumed run needs to continue identically."""
        arrays = {f"{attr}/{k}": v for attr in self.STATE_ATTRS
                  for k, v in (getattr(self, attr, None) or {}).items()}
        return arrays, {}

    def restore(self, arrays: Mapping[str, np.ndarray],
                scalars: Mapping[str, float]) -> None:
        """Inverse of :meth:`state`."""
        for attr in self.STATE_ATTRS:
            got = {k.split("/", 1)[1]: np.array(v) for k, v in arrays.items()
                   if k.startswith(attr + "/")}
            if got:
                setattr(self, attr, got)


class FedTuneAvg(FedTuneStrategy, FedAvg):
    """FedAvg (weighted by ``num-examples``)."""


class FedTuneAvgM(FedTuneStrategy, FedAvgM):
    """FedAvg, applied with server-side momentum (Hsu et al. 2019): the momentum
    averages the sites' DP noise over rounds while the signal adds up."""

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        arrays, scalars = super().state()
        for i, v in enumerate(self.momentum_vector or []):
            arrays[f"momentum/{i:06d}"] = np.asarray(v)
        return arrays, scalars

    def restore(self, arrays: Mapping[str, np.ndarray],
                scalars: Mapping[str, float]) -> None:
        super().restore(arrays, scalars)
        saved = sorted(k for k in arrays if k.startswith("momentum/"))
        if saved:
            self.momentum_vector = [np.array(arrays[k]) for k in saved]


class FedTuneProx(FedTuneStrategy, FedProx):
    """FedAvg; the sites add the proximal step (``proximal-mu`` in the config)."""


class FedTuneAdam(FedTuneStrategy, FedAdam):
    """FedAvg of the updates, applied with a server-side Adam step."""


class FedTuneYogi(FedTuneStrategy, FedYogi):
    """FedAvg of the updates, applied with a server-side Yogi step."""


class FedTuneAdagrad(FedTuneStrategy, FedAdagrad):
    """FedAvg of the updates, applied with a server-side Adagrad step."""


class FedTuneMedian(FedTuneStrategy, FedMedian):
    """Coordinate-wise median of the accepted updates."""


class FedTuneTrimmedAvg(FedTuneStrategy, FedTrimmedAvg):
    """Coordinate-wise mean after cutting ``beta`` of the values at each end."""


class FedTuneKrum(FedTuneStrategy, MultiKrum):
    """(Multi-)Krum: average the ``select`` update(s) closest to their neighbours
    (``select=0``: all but ``num_malicious_nodes`` of those that arrived)."""

    def __init__(self, *, select: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.select = select

    def _combine(self, server_round: int, good: list[Message]
                 ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.num_nodes_to_select = self.select or max(
            1, len(good) - self.num_malicious_nodes)
        return super()._combine(server_round, good)


def build_strategy(fed: FederationConfig | None = None, *,
                   privacy: PrivacyConfig | None = None,
                   ffa_digest: float | None = None, lower_ranks: bool = False,
                   **kwargs: object) -> FedTuneStrategy:
    """The strategy ``federation.strategy`` names, with central DP if asked.

    ``kwargs`` go to Flower's strategy (sampling fractions and minimums).
    """
    fed = fed or FederationConfig()
    common = {"max_update_norm": fed.max_update_norm, "compression": fed.compression,
              "min_replies": fed.min_replies, "ffa_digest": ffa_digest,
              "lower_ranks": lower_ranks, "weighting": fed.weighting, **kwargs}
    opt = {"eta": fed.server_learning_rate, "beta_1": fed.server_beta_1,
           "beta_2": fed.server_beta_2, "tau": fed.server_tau}
    if privacy is not None and privacy.central_dp:
        from fedtune.server.central_dp import CentralDPAvg

        if fed.strategy != "fedavg":
            raise ValueError("central DP runs on fedavg only")
        return CentralDPAvg(noise_multiplier=privacy.central_noise_multiplier,
                            clipping_norm=privacy.central_clipping_norm,
                            delta=privacy.target_delta, **common)
    made: dict[str, Callable[[], FedTuneStrategy]] = {
        "fedavg": lambda: FedTuneAvg(**common),
        "fedavgm": lambda: FedTuneAvgM(server_learning_rate=fed.server_learning_rate,
                                       server_momentum=fed.server_momentum,
                                       **common),
        "fedprox": lambda: FedTuneProx(proximal_mu=fed.proximal_mu, **common),
        "fedadam": lambda: FedTuneAdam(**opt, **common),
        "fedyogi": lambda: FedTuneYogi(**opt, **common),
        "fedadagrad": lambda: FedTuneAdagrad(eta=fed.server_learning_rate,
                                             tau=fed.server_tau, **common),
        "median": lambda: FedTuneMedian(**common),
        "trimmed-mean": lambda: FedTuneTrimmedAvg(beta=fed.trim_fraction, **common),
        "krum": lambda: FedTuneKrum(num_malicious_nodes=fed.krum_malicious,
                                    select=1, **common),
        "multi-krum": lambda: FedTuneKrum(num_malicious_nodes=fed.krum_malicious,
                                          select=fed.krum_select, **common),
    }
    if fed.strategy not in made:
        raise ValueError(f"unknown strategy {fed.strategy!r}")
    return made[fed.strategy]()
