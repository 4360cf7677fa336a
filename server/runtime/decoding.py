"""The sites' training replies, decoded and checked before aggregation.

Each reply's update is decoded in place (compressed deltas, lower LoRA ranks padded
to the global's, :mod:`fedtune.common.updates`) and checked
(:mod:`fedtune.server.runtime.validation`);
a reply that must not be averaged is dropped and
its reason recorded with the node id. The strategy calls :func:`accept` first in
``aggregate_train``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedtune.common import records, updates
from fedtune.server.runtime import validation
from fedtune.server.runtime.stats import RoundStats, site_label

logger = logging.getLogger(__name__)
Arrays = dict[str, np.ndarray]


@dataclass
class Expected:
    """What this server accepts: the round's global adapter and the run's rules."""

    compression: str = "none"
    lower_ranks: bool = False  # accept lower-rank updates (HetLoRA)
    max_norm: float = 0.0
    ffa_digest: float | None = None
    current: Arrays = field(default_factory=dict)  # the global adapter this round
    frozen: frozenset[str] = frozenset()  # not sent, not trained: kept as they are
    node_ranks: dict[int, int] = field(default_factory=dict)  # learnt from replies


def accept(replies: list[Message], expected: Expected, stats: RoundStats
           ) -> list[Message]:
    """The replies to aggregate (error replies pass through, to be counted):
    updates decoded in place; each rejected one logged and kept in ``stats``."""
    ok = [m for m in replies if not m.has_error()]
    keys = validation.usual_keys([frozenset(m.content.metric_records.get(
        records.METRICS, MetricRecord())) for m in ok])
    kept = [m for m in replies if m.has_error()]
    for msg in ok:
        reason = _reason(msg, keys, expected)
        if reason is None:
            kept.append(msg)
        else:
            node = str(msg.metadata.src_node_id)
            stats.nodes_rejected[node] = reason
            part = msg.content.metric_records.get(records.METRICS, MetricRecord()
                                                  ).get(records.PARTITION)
            if isinstance(part, int | float):  # a simulated site: by its name
                stats.site_by_node[node] = records.site_name(int(part))
            logger.warning("rejected the update of %s: %s",
                           site_label(stats.site_by_node, node), reason)
    return kept


def _reason(msg: Message, keys: frozenset[str], expected: Expected) -> str | None:
    """Why this reply cannot be aggregated (None: decoded in place, accepted)."""
    content = msg.content
    if set(content.array_records) != {records.ARRAYS} or \
            set(content.metric_records) != {records.METRICS}:
        return (f"records {sorted(content.array_records)} + "
                f"{sorted(content.metric_records)}; expected one ArrayRecord "
                f"{records.ARRAYS!r} and one MetricRecord {records.METRICS!r}")
    metrics = dict(content.metric_records[records.METRICS])
    problem = validation.check_metrics(metrics, keys)
    current = expected.current
    if problem or not current:
        return problem
    if expected.ffa_digest is not None and \
            metrics.get(records.LORA_A_DIGEST) != expected.ffa_digest:
        return ("its frozen LoRA A differs from the server's (FFA-LoRA needs the "
                "same train.seed, model and peft version on every site)")
    sent = {k: v.numpy() for k, v in content.array_records[records.ARRAYS].items()}
    if expected.frozen & sent.keys():
        return (f"it sends tensors frozen in this head-only round "
                f"({sorted(expected.frozen & sent.keys())[:3]}); a head-only round "
                "exchanges the classification head only")
    trained = {k: v for k, v in current.items() if k not in expected.frozen}
    try:
        update = updates.decode(sent, trained, expected.compression)
        if expected.lower_ranks:
            update = updates.pad(update, trained)
    except updates.UpdateError as err:
        return str(err)
    # the frozen tensors (LoRA in a head-only round) as the server holds them, in
    # the global adapter's order: Flower's server optimizers (FedAvgM, FedAdam)
    # pair the aggregate with the global arrays by position
    update = {k: update.get(k, current[k]) for k in current
              if k in update or k in expected.frozen} | update
    problem = validation.check_arrays(update, current, max_norm=expected.max_norm)
    if problem is None:
        rank = updates.site_rank(sent) if expected.lower_ranks else None
        if rank is not None and rank < (updates.site_rank(current) or 0):
            expected.node_ranks[msg.metadata.src_node_id] = rank
        content[records.ARRAYS] = ArrayRecord(
            {k: Array(np.asarray(v, np.float32)) for k, v in update.items()})
    return problem
