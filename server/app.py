"""ServerApp: Flower wiring only (strategy, evaluation and checkpoints live beside)."""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from fedtune.client.trainer import resolve_device
from fedtune.common import planning, records
from fedtune.common.config import RESUME, RUN_PATH, RunConfig, from_run_config
from fedtune.common.deployment import INSECURE_ENV, ensure_app_logging
from fedtune.common.errors import FedtuneError
from fedtune.common.model import (
    adapter_state,
    build_model,
    exchanged_state,
    frozen_a_digest,
    save_adapter,
    set_adapter_state,
)
from fedtune.server import checkpoint, rounds
from fedtune.server.daemon import RUNS_DIR_ENV
from fedtune.server.evaluate import CentralEvaluator
from fedtune.server.events import EventLog
from fedtune.server.preflight import preflight
from fedtune.server.strategy import FedTuneStrategy, all_declined, build_strategy

logger = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class RoundRecorder:
    """Strategy ``evaluate_fn``: central eval, checkpoint, metrics line, summary log."""

    def __init__(self, *, cfg: RunConfig, run_dir: Path, strategy: FedTuneStrategy,
                 evaluator: CentralEvaluator, model: Any) -> None:
        self.cfg, self.run_dir, self.strategy = cfg, run_dir, strategy
        self.evaluator, self.model = evaluator, model
        self.t_last = time.perf_counter()
        self.bar = tqdm(total=cfg.federation.num_rounds, desc="rounds", unit="round")
        self.events = EventLog(run_dir)
        self.meta = {"task": cfg.model.task, "base_model": cfg.model.name_or_path,
                     "gguf_file": cfg.model.gguf_file, "labels": list(cfg.data.labels),
                     "head": ("masked mean pooling + " + (
                         f"linear({cfg.model.head_hidden}) + GELU + linear"
                         if cfg.model.head_hidden else "linear"))
                     if cfg.model.task == "classification" else None}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        round_seconds = time.perf_counter() - self.t_last
        state = {**adapter_state(self.model), **records.from_record(arrays)}
        t0 = time.perf_counter()
        ev = self.evaluator(state)
        eval_seconds = time.perf_counter() - t0
        row: dict[str, Any] = {"round": server_round, **{
            f"eval_{k.replace('-', '_')}": v for k, v in ev.items()}}
        if "top_prediction" in ev:
            row.update(spread_words(ev, self.cfg.data.labels))
        if server_round > 0:
            stats = self.strategy.round_stats.get(server_round)
            if stats is None or stats.replied == 0:
                failed = stats.failed if stats else 0
                if stats and stats.nodes_declined and \
                        len(stats.nodes_declined) == failed:
                    raise all_declined(server_round, failed)
                raise FedtuneError(
                    f"round {server_round}: no site returned an update ({failed} "
                    "failed); the sites' errors are logged above (look for 'Received "
                    "error in reply'). Fix them and start the run again.")
            self._checkpoint(server_round, state)
            train = self.strategy.train_metrics.get(server_round, {})
            row.update({"train_loss": train.get(records.TRAIN_LOSS),
                        **stats.summary(),
                        "round_seconds": round_seconds, "eval_seconds": eval_seconds})
            central = getattr(self.strategy, "client_epsilon", {})
            if server_round in central:
                row["client_epsilon"] = central[server_round]
            fed = self.strategy.eval_metrics.get(server_round)
            if fed:
                row["federated_eval"] = fed
            self._log(row)
            self.bar.update(1)
        row = _clean(row)
        checkpoint.append_metrics(self.run_dir, row)
        self.events.write(row)
        self.t_last = time.perf_counter()
        return MetricRecord({k: float(v) for k, v in ev.items()}) if ev else None

    def close(self) -> None:
        self.bar.close()
        self.events.close()

    def _checkpoint(self, server_round: int, state: dict[str, Any]) -> None:
        final = checkpoint.checkpoint_dir(self.run_dir, server_round)
        tmp = final.with_name(final.name + ".tmp")
        for stale in (tmp, final):  # a crashed attempt's leftovers
            if stale.is_dir():
                shutil.rmtree(stale)
        set_adapter_state(self.model, state)
        save_adapter(self.model, tmp, meta={**self.meta, "round": server_round})
        tmp.replace(final)
        checkpoint.publish_final(self.run_dir, server_round)

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
        rho = row.get("rho_max")
        if rho is not None:
            quality += f" | noise rho max {rho:.3f} ({planning.verdict(rho)})"
        logger.info(
            "round %d/%d | train loss %.4f | eval loss %.4f %s | eps max %s | "
            "%d/%d clients | %.2f MB up %.2f MB down | %.1f s",
            row["round"], self.cfg.federation.num_rounds, row["train_loss"] or math.nan,
            row.get("eval_loss", math.nan), quality,
            "off (no DP)" if eps is None else f"{eps:.3f}",
            row.get("clients_replied", 0), row.get("clients_sampled", 0),
            row.get("bytes_received", 0) / 1e6, row.get("bytes_sent", 0) / 1e6,
            row["round_seconds"])
        if row.get("epsilon_by_node"):
            logger.info("round %d epsilon by node: %s", row["round"], ", ".join(
                f"{k}={v:.3f}" for k, v in row["epsilon_by_node"].items()))
        if row.get("dp_by_node"):
            logger.info("round %d DP-SGD by node (records, sigma, q, steps, rho): %s",
                        row["round"], "; ".join(
                            f"{k}: {int(v['records'])}, {v['sigma']:.3f}, "
                            f"{v['sample_rate']:.4f}, {int(v['steps'])}, "
                            f"{v['rho']:.3f}" for k, v in row["dp_by_node"].items()))
        if row.get("eval_collapse"):
            logger.warning("round %d: the global model collapsed: %s", row["round"],
                           row["eval_collapse"])
        if row.get("nodes_failed"):
            logger.warning("round %d: node(s) %s failed or did not answer",
                           row["round"], ", ".join(row["nodes_failed"]))


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


def _run_dir(flat: Mapping[str, Any], cfg: RunConfig, run_id: int) -> Path:
    """The CLI's exact path, else the server's runs directory, else the config's."""
    if flat.get(RUN_PATH):
        return Path(str(flat[RUN_PATH]))
    if os.environ.get(RUNS_DIR_ENV):
        return checkpoint.new_run_dir(os.environ[RUNS_DIR_ENV], f"run-{run_id}")
    return checkpoint.new_run_dir(cfg.federation.run_dir, "run")


def make_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``defaults`` is a flat run_config under Flower's own."""
    defaults = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        ensure_app_logging()
        flat = {**defaults, **context.run_config}
        cfg = from_run_config(flat)
        resuming = bool(flat.get(RESUME))
        if resuming and not flat.get(RUN_PATH):
            raise FedtuneError("resume needs the run directory (fedtune simulate "
                               "--resume RUN_DIR / fedtune run --resume RUN_DIR)")
        run_dir = _run_dir(flat, cfg, context.run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            checkpoint.write_config(run_dir, cfg)
        if not cfg.privacy.enabled:
            logger.warning("DP is OFF for this run (privacy.enabled=false): sites "
                           "send non-private adapter updates")
        model = build_model(cfg.model, cfg.lora, num_labels=len(cfg.data.labels),
                            seed=cfg.train.seed)
        initial = records.to_record(exchanged_state(model, cfg.lora))
        evaluator = CentralEvaluator(cfg, model, resolve_device("auto"))
        fed = cfg.federation
        strategy = build_strategy(
            fed, privacy=cfg.privacy,
            ffa_digest=frozen_a_digest(model) if cfg.lora.ffa else None,
            lower_ranks=bool(cfg.lora.site_ranks) or cfg.lora.heterogeneous_ranks,
            fraction_train=fed.fraction_train,
            fraction_evaluate=fed.fraction_evaluate,
            min_train_nodes=fed.min_train_nodes,
            min_evaluate_nodes=min(fed.min_train_nodes, 2),
            min_available_nodes=fed.min_train_nodes)
        recorder = RoundRecorder(cfg=cfg, run_dir=run_dir, strategy=strategy,
                                 evaluator=evaluator, model=model)
        logger.info("run directory: %s", run_dir)
        rounds.wait_for_nodes(grid, fed.min_train_nodes, fed.round_timeout)
        preflight(grid, cfg, run_dir=run_dir, dims=planning.model_dims(cfg, model),
                  timeout=fed.round_timeout)
        if fed.secure_aggregation:
            from fedtune.server.secagg import run_secagg

            if cfg.privacy.central_dp or resuming:
                raise FedtuneError("federation.secure_aggregation cannot be combined "
                                   "with privacy.central_dp (central DP clips each "
                                   "update, which SecAgg+ hides) or with --resume")
            run_secagg(grid, context, cfg=cfg, initial=exchanged_state(model, cfg.lora),
                       recorder=recorder)
            recorder.close()
            return
        done = 0
        if resuming:
            done, initial = rounds.resume(run_dir, strategy=strategy, cfg=cfg)
            recorder.bar.update(done)
        else:
            random.seed(cfg.train.seed)  # Flower samples nodes with `random`
        rounds.run_rounds(grid, strategy, cfg=cfg, run_dir=run_dir, arrays=initial,
                          recorder=recorder, resumed=done)
        recorder.close()

    return app


app = make_server_app()
