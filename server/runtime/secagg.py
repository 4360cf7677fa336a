"""Secure aggregation (SecAgg+): the server learns only the sum of the updates.

In flwr 1.39 SecAgg+ runs on Flower's legacy workflow: a ``LegacyContext`` around a
legacy ``FedAvg``, driven by ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow)``;
sites answer through ``secaggplus_mod`` (see ``fedtune.client.app``). All the
cryptography is Flower's. fedtune adds the same per-round record as the plain path:
central evaluation, a checkpoint and a ``metrics.jsonl`` line, with the sites'
scalar metrics (which SecAgg+ does not hide) and no per-site tensors (which it does).

Threat model, in plain words: the server and the network see each site's update
only masked; masks cancel in the sum. A site that drops out after sharing its keys
is tolerated as long as at least ``reconstruction_threshold`` sites remain (their
shares rebuild its mask). The protection holds against an honest-but-curious
server and fewer than ``threshold`` colluding sites; it does not stop a site from
sending a poisoned update, and the aggregate itself is visible (use DP for that).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.common import (
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedtune.common import records
from fedtune.common.config import RunConfig
from fedtune.common.distributed_noise import levels_for
from fedtune.server.runtime.pooled import PooledStep
from fedtune.server.runtime.recorder import RoundRecorder
from fedtune.server.runtime.stats import RoundStats, record_site_metrics

logger = logging.getLogger(__name__)


def to_ndarrays(state: dict[str, Any]) -> list[np.ndarray]:
    """Adapter state -> arrays in name order (both sides build the same model)."""
    return [state[k].detach().cpu().numpy() for k in sorted(state)]


def from_ndarrays(names: list[str], arrays: list[np.ndarray]) -> ArrayRecord:
    return records.to_record({n: _tensor(a) for n, a in
                              zip(sorted(names), arrays, strict=True)})


def _tensor(a: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class SecAggFedAvg(LegacyFedAvg):
    """Legacy FedAvg that keeps fedtune's :class:`RoundStats` from fit results."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.round_stats: dict[int, RoundStats] = {}
        self.train_metrics: dict[int, dict[str, float]] = {}
        self.eval_metrics: dict[int, dict[str, float]] = {}
        self.client_epsilon: dict[int, float] = {}  # no central DP with SecAgg+
        self.site_labels: dict[str, str] = {}  # node id -> the operator's label

    def aggregate_fit(self, server_round: int,
                      results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None,
                                                    dict[str, Scalar]]:
        stats = self.round_stats.setdefault(
            server_round, RoundStats(site_by_node=dict(self.site_labels)))
        stats.sampled = len(results) + len(failures)
        stats.replied, stats.failed = len(results), len(failures)
        losses, weights = [], []
        for proxy, res in results:
            node = str(proxy.node_id)
            stats.nodes_replied.append(node)
            record_site_metrics(stats, node, res.metrics)
            losses.append(float(res.metrics.get(records.TRAIN_LOSS, math.nan)))
            weights.append(res.num_examples)
        if weights and sum(weights):
            self.train_metrics[server_round] = {records.TRAIN_LOSS: float(
                np.average(losses, weights=weights))}
        # Every result carries the same unmasked aggregate (Flower's workflow puts
        # it there); FedAvg over identical arrays returns it unchanged.
        return super().aggregate_fit(server_round, results, failures)


class PooledNoiseAvg(SecAggFedAvg):
    """SecAgg+'s FedAvg whose "average" is the pooled noisy gradient sum of
    distributed noise: one server step on it (:class:`~fedtune.server.runtime.
    pooled.PooledStep`)."""

    def __init__(self, *, step: PooledStep, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step

    def aggregate_fit(self, server_round: int,
                      results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None,
                                                    dict[str, Scalar]]:
        mean, metrics = super().aggregate_fit(server_round, results, failures)
        used = sum(int(res.metrics.get(records.NUM_EXAMPLES, 0)) for _, res in results)
        stats = self.round_stats[server_round]  # the aggregate: one pooled noise
        stats.pooled = (self.step.cfg.federation.train_nodes,
                        self.step.cfg.privacy.max_dropped_or_colluding)
        stats.weight_by_node = {str(proxy.node_id): float(
            res.metrics.get(records.NUM_EXAMPLES, 0)) for proxy, res in results}
        if mean is None or used <= 0:
            return None, metrics
        # each share's SecAgg+ weight is 1: the average times the shares is the sum
        total = [a * len(results) for a in parameters_to_ndarrays(mean)]
        new = self.step(server_round, total, shares=len(results), records=used)
        return ndarrays_to_parameters([a.astype(np.float32) for a in new]), metrics


def run_secagg(grid: Grid, context: Context, *, cfg: RunConfig,
               initial: dict[str, Any], recorder: RoundRecorder) -> None:
    """Run ``cfg.federation.num_rounds`` SecAgg+ rounds; ``recorder`` records each
    (``evaluate_fn`` of the plain path)."""
    names = sorted(initial)
    fed = cfg.federation

    def evaluate(server_round: int, arrays: list[np.ndarray], _: dict[str, Any]
                 ) -> tuple[float, dict[str, Scalar]] | None:
        if recorder.stop_early:  # the rounds Flower's loop still counts are skipped
            return None
        metric = recorder(server_round, from_ndarrays(names, arrays))
        row: dict[str, Any] = dict(metric or {})
        return float(row.get("loss", math.nan)), row

    common: dict[str, Any] = dict(
        fraction_fit=fed.fraction_train, fraction_evaluate=0.0,
        min_fit_clients=fed.train_nodes, min_available_clients=fed.train_nodes,
        initial_parameters=ndarrays_to_parameters(to_ndarrays(initial)),
        evaluate_fn=evaluate, accept_failures=True)
    distributed = cfg.privacy.enabled and cfg.privacy.noise == "distributed"
    strategy: SecAggFedAvg
    if distributed:  # the sum is a gradient: one server step on it (pooled.py)
        strategy = PooledNoiseAvg(step=PooledStep(
            cfg=cfg, names=names, initial=to_ndarrays(initial)), **common)
    else:
        strategy = SecAggFedAvg(**common)
    strategy.site_labels = dict(recorder.strategy.site_labels)
    recorder.strategy = strategy
    legacy = LegacyContext(context=context, config=ServerConfig(
        num_rounds=fed.num_rounds, round_timeout=fed.round_timeout), strategy=strategy)
    shares = max(3, fed.train_nodes)
    # distributed noise: each site sends integers on the grid with weight 1; the
    # levels keep the sum below the modulus (fedtune.common.distributed_noise)
    secagg = SecAggPlusWorkflow(
        num_shares=shares, reconstruction_threshold=fed.secagg_threshold,
        clipping_range=fed.secagg_clipping_range, timeout=fed.round_timeout,
        max_weight=1.0 if distributed else 1000.0,  # 1000: Flower's default
        quantization_range=(levels_for(fed.train_nodes) if distributed
                            else 2**22))  # 2**22: Flower's default

    def fit(grid: Grid, context: Context) -> None:
        # Flower's loop runs num_rounds; after an early stop its rounds do nothing
        if not recorder.stop_early:
            secagg(grid, context)

    workflow = DefaultWorkflow(fit_workflow=fit)
    t0 = time.perf_counter()
    logger.info("secure aggregation (SecAgg+): %d shares, reconstruction threshold "
                "%d, clipping range %g", shares, fed.secagg_threshold,
                fed.secagg_clipping_range)
    if distributed:
        logger.info("distributed noise: each site adds 1/%d of the noise variance; "
                    "a sum is unmasked only with at least %d sites' key shares (up "
                    "to %d may drop out or collude)", fed.train_nodes
                    - cfg.privacy.max_dropped_or_colluding, fed.secagg_threshold,
                    cfg.privacy.max_dropped_or_colluding)
    workflow(grid, legacy)
    logger.info("SecAgg+ run finished in %.1f s", time.perf_counter() - t0)

