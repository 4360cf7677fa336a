"""The round recorder: after every round, central evaluation, the adapter
checkpoint, one metrics line (metrics.jsonl, events, console) and the summary log.

It reads what the round's strategy kept through :class:`Recorded`, which every
strategy it records satisfies: the FedAvg family (:mod:`.strategy`), central DP
(:mod:`.central_dp`) and the SecAgg+ path (:mod:`.secagg`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, MetricRecord
from tqdm.auto import tqdm

from fedtune.common import answers, planning, records
from fedtune.common.config import RunConfig
from fedtune.common.deployment import DETAIL, INSECURE_ENV
from fedtune.common.model import adapter_state, save_adapter, set_adapter_state
from fedtune.server import rundir
from fedtune.server.runtime import checkpoint
from fedtune.server.runtime.central_eval import CentralEvaluator
from fedtune.server.runtime.events import EventLog
from fedtune.server.runtime.selection import Selection
from fedtune.server.runtime.stats import (
    RoundStats,
    check_round,
    failed_sites,
    site_label,
)

logger = logging.getLogger(__name__)


class Recorded(Protocol):
    """What a strategy keeps per round for the recorder to read."""

    round_stats: dict[int, RoundStats]
    train_metrics: dict[int, dict[str, float]]
    eval_metrics: dict[int, dict[str, float]]
    client_epsilon: dict[int, float]  # central DP's client-level epsilon; else empty
    site_labels: dict[str, str]  # node id -> the operator's label


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


SUMMARY_KEYS = ("loss", "accuracy", "macro-f1", "perplexity", "retention_perplexity",
                "answer_exact")


def progress_bar(rounds: int) -> tqdm:
    """The rounds bar, sized by :func:`shutil.get_terminal_size`: a terminal that
    reports 0 x 0 (some consoles, ``docker exec`` without a size) made tqdm hide
    the bar, which then showed only when the output was piped."""
    size = shutil.get_terminal_size()  # COLUMNS/LINES, else 80 x 24 for 0 x 0
    return tqdm(total=rounds, desc="rounds", unit="round", ncols=size.columns,
                nrows=size.lines)


class RoundRecorder:
    """Strategy ``evaluate_fn``: central eval, checkpoint, metrics line, summary log."""

    def __init__(self, *, cfg: RunConfig, run_dir: Path, strategy: Recorded,
                 evaluator: CentralEvaluator, model: torch.nn.Module) -> None:
        self.cfg, self.run_dir, self.strategy = cfg, run_dir, strategy
        self.evaluator, self.model = evaluator, model
        self.t_last = time.perf_counter()
        self.bar = progress_bar(cfg.federation.num_rounds)
        self.events = EventLog(run_dir)
        # the best round and early stopping, on the central evaluation
        self.selection = Selection.for_run(cfg) if evaluator.size else None
        self.initial_extra: dict[str, Any] = {}  # round 0's: where the head starts
        self.meta = {"task": cfg.model.task, "base_model": cfg.model.name_or_path,
                     "gguf_file": cfg.model.gguf_file, "labels": list(cfg.data.labels),
                     "head": ("masked mean pooling + " + (
                         f"linear({cfg.model.head_hidden}) + GELU + linear"
                         if cfg.model.head_hidden else "linear"))
                     if cfg.model.task == "classification" else None}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        round_seconds = time.perf_counter() - self.t_last
        state = {**adapter_state(self.model), **records.from_record(arrays)}
        if server_round == 0 and self.evaluator.size:
            logger.info("round 0: evaluating the model before training on %d held-out "
                        "records", self.evaluator.size)
        t0 = time.perf_counter()
        ev = self.evaluator(state)
        retained = self.evaluator.retention(state)
        eval_seconds = time.perf_counter() - t0
        row: dict[str, Any] = {"round": server_round, **{
            f"eval_{k.replace('-', '_')}": v for k, v in ev.items()}, **retained}
        if server_round == 0:
            row.update({f"baseline_{k}": v for k, v in
                        self.evaluator.majority_baseline().items()})
            row.update(self.initial_extra)
            if ev or retained:
                logger.info("round 0 (before training): %s (%.0f s)", ", ".join(
                    f"{k} {v:.4g}" for k, v in {**ev, **retained}.items()
                    if isinstance(v, int | float) and k in SUMMARY_KEYS),
                    eval_seconds)
        if "top_prediction" in ev:
            row.update(spread_words(ev, self.cfg.data.labels))
        if server_round > 0:
            stats = check_round(server_round,
                                self.strategy.round_stats.get(server_round))
            self._checkpoint(server_round, state)
            train = self.strategy.train_metrics.get(server_round, {})
            row.update({"train_loss": train.get(records.TRAIN_LOSS),
                        **stats.summary(),
                        "round_seconds": round_seconds, "eval_seconds": eval_seconds})
            central = self.strategy.client_epsilon
            if server_round in central:
                row["client_epsilon"] = central[server_round]
            fed = self.strategy.eval_metrics.get(server_round)
            if fed:
                row["federated_eval"] = fed
            self._select(server_round, row)
            self._log(row)
            self.bar.update(1)
        row = _clean(row)
        checkpoint.append_metrics(self.run_dir, row)
        self.events.write(row)
        self.t_last = time.perf_counter()
        return MetricRecord({k: float(v) for k, v in ev.items()}) if ev else None

    @property
    def stop_early(self) -> bool:
        """Whether the last recorded round ended the run (early stopping)."""
        return self.selection is not None and self.selection.should_stop

    def _select(self, server_round: int, row: dict[str, Any]) -> None:
        sel = self.selection
        if sel is None:
            return
        if sel.update(server_round, row):
            checkpoint.publish(self.run_dir, server_round, name=rundir.BEST)
        row.update(sel.fields())
        if sel.should_stop:
            logger.warning("round %d: stopping early: %s", server_round, sel.reason())

    def close(self) -> None:
        self.bar.close()
        self.events.close()
        rounds = sorted(self.strategy.round_stats.items())
        failed = failed_sites(((rnd, stats.failed_why) for rnd, stats in rounds),
                              {k: v for _, s in rounds for k, v in
                               s.site_by_node.items()})
        if failed:  # the operator's console (`fedtune run` streams this log)
            logger.warning("sites that failed in this run: %s", failed)

    def _checkpoint(self, server_round: int, state: dict[str, Any]) -> None:
        final = rundir.checkpoint_dir(self.run_dir, server_round)
        tmp = final.with_name(final.name + ".tmp")
        for stale in (tmp, final):  # a crashed attempt's leftovers
            if stale.is_dir():
                shutil.rmtree(stale)
        set_adapter_state(self.model, state)
        save_adapter(self.model, tmp, meta={**self.meta, "round": server_round})
        tmp.replace(final)
        checkpoint.publish(self.run_dir, server_round)

    def _log(self, row: dict[str, Any]) -> None:
        if os.environ.get(INSECURE_ENV) == "1":
            logger.warning("INSECURE DEPLOYMENT: TLS and node authentication are OFF "
                           "(fedtune server --insecure); this round's updates "
                           "travelled in clear text from unauthenticated nodes")
        if not self.cfg.privacy.enabled:
            logger.warning("DP is OFF: this round's adapter updates are not "
                           "differentially private (privacy.enabled=false)")
        eps = row.get("epsilon_max")
        quality = (f"acc {row['eval_accuracy']:.3f} macro-F1 {row['eval_macro_f1']:.3f}"
                   if "eval_accuracy" in row else
                   f"ppl {row.get('eval_perplexity', float('nan')):.2f}")
        if row.get("eval_collapse"):
            quality += f" | COLLAPSED: {row['eval_collapse']}"
        if row.get("eval_answer_exact") is not None:
            quality += " | answers " + answers.words(row)
        if row.get("retention_perplexity") is not None:
            quality += f" | retention ppl {row['retention_perplexity']:.2f}"
        rho, agg = row.get("rho_max"), row.get("rho_aggregate")
        if rho is not None and agg is not None:
            words = planning.verdict(agg, self.cfg.model.task)
            quality += (f" | noise rho {agg:.3f} in the aggregate ({words}; worst "
                        f"site {rho:.3f})")
        logger.info(
            "round %d/%d | train loss %.4f | eval loss %.4f %s | eps max %s | "
            "%d/%d clients | %.2f MB up %.2f MB down | %.1f s",
            row["round"], self.cfg.federation.num_rounds, row["train_loss"] or math.nan,
            row.get("eval_loss", math.nan), quality,
            "off (no DP)" if eps is None else f"{eps:.3f}",
            row.get("clients_replied", 0), row.get("clients_sampled", 0),
            row.get("bytes_received", 0) / 1e6, row.get("bytes_sent", 0) / 1e6,
            row["round_seconds"])
        names = row.get("site_by_node") or {}

        def site(node: str) -> str:
            return site_label(names, node)

        if row.get("epsilon_by_node"):
            logger.info("round %d epsilon by site: %s", row["round"], ", ".join(
                f"{site(k)}={v:.3f}" for k, v in row["epsilon_by_node"].items()),
                extra=DETAIL)
        if row.get("dp_by_node"):
            logger.info("round %d DP-SGD by site (records, sigma, q, steps, rho): %s",
                        row["round"], "; ".join(
                            f"{site(k)}: {int(v['records'])}, {v['sigma']:.3f}, "
                            f"{v['sample_rate']:.4f}, {int(v['steps'])}, "
                            f"{v['rho']:.3f}" for k, v in row["dp_by_node"].items()),
                        extra=DETAIL)
        if row.get("eval_collapse"):
            logger.warning("round %d: the global model collapsed: %s", row["round"],
                           row["eval_collapse"])
        if row.get("nodes_failed"):
            why = row.get("nodes_failed_why") or {}
            logger.warning("round %d: %s", row["round"], "; ".join(
                f"{site(n)} failed: {why[n]}" if n in why else
                f"{site(n)} did not answer" for n in row["nodes_failed"]))


def spread_words(ev: Mapping[str, Any], labels: Sequence[str]) -> dict[str, Any]:
    """The prediction spread in words: the most predicted label, and a sentence
    when the model predicts (nearly) one class only."""
    top = labels[int(ev["top_prediction"])]
    out: dict[str, Any] = {"eval_top_prediction": top}
    if ev.get("collapsed"):
        f1 = [v for k, v in ev.items() if k.startswith("f1-")]
        out["eval_collapse"] = (
            f"predicts {top!r} for {ev['top_prediction_share']:.0%} of the test "
            f"records; {sum(1 for v in f1 if v == 0)} of {len(f1)} classes at F1 0")
    return out
