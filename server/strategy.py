"""LoRA-aware strategies: small subclasses of Flower's Message-API strategies.

:class:`FedTuneAvg` is Flower's FedAvg (weighted by ``num-examples`` over the adapter
tensors) plus one thing: it keeps the per-round facts the run directory needs (bytes
sent and received, client epsilons, failures) in :attr:`round_stats`.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.common import records
from fedtune.common.config import PrivacyConfig
from fedtune.server import validation

logger = logging.getLogger(__name__)
DECLINED = "PrivacyBudgetExhausted"  # in a site's error reply: it declined the round


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
            "clients_missing": max(0, self.sampled - self.replied - self.failed),
            "epsilon_total_by_node": dict(self.epsilon_total_by_node),
            "clients_rejected": len(self.nodes_rejected),
            "nodes_rejected": dict(self.nodes_rejected),
        }


def summarize_replies(replies: list[Message], stats: RoundStats) -> None:
    """Fill ``stats`` from the training replies (errors counted, not raised)."""
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
        arrays = msg.content.array_records.get(records.ARRAYS)
        if arrays is not None:
            stats.bytes_received += records.wire_bytes(arrays)
            stats.payload_bytes = max(stats.payload_bytes,
                                      records.payload_bytes(arrays))
        record_site_metrics(stats, node, dict(
            msg.content.metric_records.get(records.METRICS, MetricRecord())))


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


class FedTuneAvg(FedAvg):
    """FedAvg over adapter tensors that records :class:`RoundStats` each round."""

    def __init__(self, *, max_update_norm: float = 0.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.max_update_norm = max_update_norm
        self._global: dict[str, np.ndarray] = {}
        self.round_stats: dict[int, RoundStats] = {}
        self.train_metrics: dict[int, dict[str, float]] = {}
        self.eval_metrics: dict[int, dict[str, float]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord,
                        config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._global = {k: v.numpy() for k, v in arrays.items()}
        stats = self.round_stats.setdefault(server_round, RoundStats())
        stats.sampled = len(messages)
        stats.bytes_sent = len(messages) * records.wire_bytes(arrays)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        stats = self.round_stats.setdefault(server_round, RoundStats())
        replies = self._valid(replies, stats)
        summarize_replies(replies, stats)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            self.train_metrics[server_round] = dict(metrics)  # type: ignore[arg-type]
        return arrays, metrics

    def _valid(self, replies: list[Message], stats: RoundStats) -> list[Message]:
        """Drop (and log, with the node id) replies that must not be averaged."""
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
        update = {k: v.numpy() for k, v in content[records.ARRAYS].items()}  # type: ignore
        return (validation.check_metrics(dict(content[records.METRICS]), keys)  # type: ignore
                or (validation.check_arrays(update, self._global,
                                            max_norm=self.max_update_norm)
                    if self._global else None))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.eval_metrics[server_round] = dict(metrics)  # type: ignore[arg-type]
        return metrics


def build_strategy(name: str, *, privacy: PrivacyConfig | None = None,
                   max_update_norm: float = 0.0, **kwargs: object) -> FedTuneAvg:
    """The strategy named in ``federation.strategy``, with central DP if asked."""
    if name != "fedavg":
        raise ValueError(f"unknown strategy {name!r}")
    if privacy is not None and privacy.central_dp:
        from fedtune.server.central_dp import CentralDPAvg

        return CentralDPAvg(noise_multiplier=privacy.central_noise_multiplier,
                            clipping_norm=privacy.central_clipping_norm,
                            delta=privacy.target_delta,
                            max_update_norm=max_update_norm, **kwargs)
    return FedTuneAvg(max_update_norm=max_update_norm, **kwargs)
