"""Round statistics and telemetry: what one training round moved and spent, filled
from the sites' replies (bytes, errors, epsilons, DP figures), and the one check
that a round produced an update.

Pure bookkeeping on Flower messages; no aggregation math (:mod:`.strategy`).
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, MetricRecord

from fedtune.common import planning, records
from fedtune.common.errors import CONFIG_FAILURE, SITE_POLICY, FedtuneError

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
    failed_why: dict[str, str] = field(default_factory=dict)
    nodes_declined: list[str] = field(default_factory=list)
    declined_why: dict[str, str] = field(default_factory=dict)
    nodes_rejected: dict[str, str] = field(default_factory=dict)
    epsilon_total_by_node: dict[str, float] = field(default_factory=dict)
    accepted: int = 0
    attempts: int = 1
    weight_by_node: dict[str, float] = field(default_factory=dict)
    dp_by_node: dict[str, dict[str, float]] = field(default_factory=dict)
    site_by_node: dict[str, str] = field(default_factory=dict)
    config_failures: dict[str, str] = field(default_factory=dict)  # deterministic
    # distributed noise: (n, t), the sites a round trains and the margin; the
    # aggregate then holds one pooled noise, not one per site
    pooled: tuple[int, int] | None = None

    @property
    def every_site_declined(self) -> bool:
        """Every sampled site declined the round (budgets exhausted)."""
        return bool(self.nodes_declined) and len(self.nodes_declined) == self.sampled

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
            "nodes_failed_why": dict(self.failed_why),
            "clients_declined": len(self.nodes_declined),
            "nodes_declined": list(self.nodes_declined),
            "nodes_declined_why": dict(self.declined_why),
            "epsilon_total_by_node": dict(self.epsilon_total_by_node),
            "clients_rejected": len(self.nodes_rejected),
            "nodes_rejected": dict(self.nodes_rejected),
            "clients_late": max(0, self.sampled - self.replied - self.failed
                                - len(self.nodes_rejected)),
            "round_attempts": self.attempts,
            "weight_by_node": dict(self.weight_by_node),
            "dp_by_node": {k: dict(v) for k, v in self.dp_by_node.items()},
            "site_by_node": dict(self.site_by_node),
            "rho_max": max((v["rho"] for v in self.dp_by_node.values()),
                           default=None),
            "rho_aggregate": self.rho_aggregate(),
        }

    def rho_aggregate(self) -> float | None:
        """The round noise ratio of the aggregate, ``sqrt(sum (w_i rho_i)^2)`` over
        the sites that replied (``w_i``: their share of the average), as the
        planner judges a federation (:func:`fedtune.common.planning.aggregate_rho`)."""
        rated = [(self.weight_by_node.get(n, 0.0), v["rho"])
                 for n, v in self.dp_by_node.items()]
        total = sum(w for w, _ in rated)
        if not rated or total <= 0:
            return None
        if self.pooled:  # one noise over the pooled records (weights: records)
            n, t = self.pooled
            return planning.pooled_ratio(rated, shares=len(rated), honest=n - t)
        return math.sqrt(sum((w / total * rho) ** 2 for w, rho in rated))


def all_declined(server_round: int, stats: RoundStats) -> FedtuneError:
    """The error that stops a run whose round every site declined."""
    why = "; ".join(sorted(set(stats.declined_why.values()))) or BUDGET_WORDS
    return FedtuneError(f"round {server_round}: every site declined "
                        f"({stats.sampled}): {why} (for this data). The run stops; "
                        "checkpoints of earlier rounds are kept.")


BUDGET_WORDS = "its privacy budget is exhausted"


def config_failed(server_round: int, stats: RoundStats) -> FedtuneError:
    """The error that stops a run whose round failed on configuration or data
    errors: no retry or resume fixes them."""
    return config_stop(f"round {server_round}", {
        site_label(stats.site_by_node, n): w
        for n, w in sorted(stats.config_failures.items())})


def config_stop(when: str, failures: Mapping[str, str]) -> FedtuneError:
    """``failures``: each site's one line (by its name), from
    :func:`failure_words`."""
    why = "; ".join(f"{site}: {words}" for site, words in failures.items())
    return FedtuneError(f"{when}: {why}. Fix the run's config or the site's data "
                        "and start a new run (retrying or resuming would meet the "
                        "same error)")


def declined_words(reason: str) -> str | None:
    """Why a site declined, from its error reply: its policy's rule (``site policy
    rule max_epsilon_per_run: ...``) or its exhausted budget; None: it failed."""
    found = re.search(rf"{SITE_POLICY} on the site: (rule .*)", reason)
    if found:
        rule = found.group(1).split("\n")[0]
        return "site policy " + re.sub(r"""['"]?>*\s*$""", "", rule)
    if DECLINED in reason:
        return BUDGET_WORDS
    return None


WRAPPERS = ("ClientAppException", "RayTaskError", "RayActorError")


def failure_words(reason: str) -> str:
    """A failed site's reply in a few words: the error class the site sent (its
    details stay in the site's own log), or Flower's own reason, shortened."""
    config = re.search(rf"(\w+) on the site \({CONFIG_FAILURE}\): ([^\n]*)", reason)
    if config:
        line = config.group(2).rstrip(" '\">")
        return f"{config.group(1)}: {line}"
    found = re.search(r"(\w+) on the site", reason)
    if found:
        return f"{found.group(1)} on the site"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", reason)  # Ray colours its tracebacks
    raised = [m for m in re.findall(r"\b(\w+(?:Error|Exception)): ([^\n']{0,80})",
                                    plain) if m[0] not in WRAPPERS]
    if raised:  # the exception a wrapped (Ray, Flower) traceback carries
        return f"{raised[-1][0]}: {raised[-1][1]}".strip()
    return plain[:120]


def site_label(names: Mapping[str, str], node: str) -> str:
    """A site as the server's log names it: a simulated site by its partition
    (``p3``, from ``names``: RoundStats.site_by_node), else ``node <id>``."""
    return names.get(node) or f"node {node}"


def failed_sites(rounds: Iterable[tuple[int, Mapping[str, str]]],
                 names: Mapping[str, str] | None = None) -> str:
    """``node 7: DataError on the site (round 1, 2); ...`` from each round's
    ``failed_why`` (empty: no site failed); ``names``: a simulated site's name
    (``p3``) by node id, in place of its node."""
    names = names or {}
    failed: dict[str, list[str]] = {}
    for rnd, why_by_node in rounds:
        for node, why in why_by_node.items():
            failed.setdefault(f"{site_label(names, node)}: {why}", []).append(
                str(rnd))
    return "; ".join(f"{k} (round {', '.join(v)})" for k, v in failed.items())


def summarize_replies(replies: list[Message], stats: RoundStats) -> None:
    """Fill ``stats`` from the training replies (errors counted, not raised; bytes
    are counted by :func:`count_bytes`, before decoding)."""
    for msg in replies:
        node = str(msg.metadata.src_node_id)
        if msg.has_error():
            stats.failed += 1
            reason = msg.error.reason or ""
            named = re.search(rf"\[({records.SITE_PREFIX}\d+)\]", reason)
            if named:  # a simulated site names its partition in its error
                stats.site_by_node[node] = named.group(1)
            why = declined_words(reason)
            if why is not None:
                stats.nodes_declined.append(node)
                stats.declined_why[node] = why
                logger.warning("%s declined the round: %s",
                               site_label(stats.site_by_node, node), why)
            else:
                stats.nodes_failed.append(node)
                stats.failed_why[node] = failure_words(reason)
                if CONFIG_FAILURE in reason:
                    stats.config_failures[node] = stats.failed_why[node]
            continue
        stats.replied += 1
        stats.nodes_replied.append(node)
        site = msg.content.config_records.get(records.SITE)
        if site is not None and isinstance(site.get(records.SITE_LABEL), str):
            # the daemon's own --label, where the operator registered none
            stats.site_by_node.setdefault(node, str(site[records.SITE_LABEL])[:64])
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
    if records.PARTITION in m:
        stats.site_by_node[node] = records.site_name(int(m[records.PARTITION]))
    dp_keys = (records.NOISE_MULTIPLIER, records.SAMPLE_RATE, records.DP_STEPS,
               records.TRAINABLE_PARAMS, records.NUM_EXAMPLES)
    if all(k in m for k in dp_keys):
        sigma, q, steps, dims, n = (float(m[k]) for k in dp_keys)
        stats.dp_by_node[node] = {
            "records": n, "sigma": sigma, "sample_rate": q, "steps": steps,
            "dims": dims, "rho": planning.round_noise_ratio(
                sigma=sigma, dims=int(dims), batch=q * n, steps=int(steps))}


def check_round(server_round: int, stats: RoundStats | None) -> RoundStats:
    """The round's statistics; raises when it ended without any update: every
    site declined (budgets exhausted) or failed."""
    if stats is not None and stats.replied > 0:
        return stats
    failed = stats.failed if stats else 0
    if stats and stats.every_site_declined:
        raise all_declined(server_round, stats)
    raise FedtuneError(
        f"round {server_round}: no site returned an update ({failed} failed); the "
        "sites' errors are logged above (look for 'Received error in reply'). Fix "
        "them and start the run again.")
