"""ServerApp: Flower wiring only (strategy, evaluation and checkpoints live beside)."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.common import planning, priors, records
from fedtune.common.config import (
    PAST_STOP,
    RESUME,
    RUN_PATH,
    SIMULATED,
    SITE_LABELS,
    RunConfig,
    from_run_config,
    site_labels,
)
from fedtune.common.deployment import ensure_app_logging
from fedtune.common.errors import FedtuneError
from fedtune.common.loops import resolve_device
from fedtune.common.model import (
    build_model,
    exchanged_state,
    frozen_a_digest,
)
from fedtune.server import rundir
from fedtune.server.runtime import checkpoint, polling, resume, rounds
from fedtune.server.runtime.calibrate import calibrate
from fedtune.server.runtime.central_eval import CentralEvaluator
from fedtune.server.runtime.personalize import personalize
from fedtune.server.runtime.privacy_plan import plan_privacy
from fedtune.server.runtime.recorder import RoundRecorder
from fedtune.server.runtime.registry import build_strategy

logger = logging.getLogger(__name__)


def _run_dir(flat: Mapping[str, Any], cfg: RunConfig, run_id: int) -> Path:
    """The CLI's exact path, else the server's runs directory, else the config's."""
    if flat.get(RUN_PATH):
        return Path(str(flat[RUN_PATH]))
    if os.environ.get(rundir.RUNS_DIR_ENV):
        return rundir.new_run_dir(os.environ[rundir.RUNS_DIR_ENV], f"run-{run_id}")
    return rundir.new_run_dir(cfg.federation.run_dir, "run")


def make_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``defaults`` is a flat run_config under Flower's own."""
    defaults = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        ensure_app_logging()
        grid = polling.quicker(grid)  # Flower's deployment Grid waits 3 s per pull
        flat = {**defaults, **context.run_config}
        cfg = from_run_config(flat)
        resuming = bool(flat.get(RESUME))
        if resuming and not flat.get(RUN_PATH):
            raise FedtuneError("resume needs the run directory (fedtune simulate "
                               "--resume RUN_DIR / fedtune run --resume RUN_DIR)")
        run_dir = _run_dir(flat, cfg, context.run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        logger.info("run directory: %s", run_dir)
        if not resuming:
            checkpoint.write_config(run_dir, cfg)
        if not cfg.privacy.enabled:
            logger.warning("DP is OFF for this run (privacy.enabled=false): sites "
                           "send non-private adapter updates")
        model = build_model(cfg.model, cfg.lora, num_labels=len(cfg.data.labels),
                            seed=cfg.train.seed)
        evaluator = CentralEvaluator(cfg, model, resolve_device("auto"))
        fed = cfg.federation
        strategy = build_strategy(
            fed, privacy=cfg.privacy,
            ffa_digest=frozen_a_digest(model) if cfg.lora.ffa else None,
            lower_ranks=cfg.lora.mixed_ranks,
            head_rounds=sum(map(cfg.exchanges_head_only,
                                range(1, fed.num_rounds + 1))),
            fraction_train=fed.fraction_train,
            fraction_evaluate=fed.fraction_evaluate,
            min_train_nodes=fed.train_nodes,
            min_evaluate_nodes=min(fed.train_nodes, 2),
            min_available_nodes=fed.train_nodes)
        strategy.site_labels = site_labels(flat.get(SITE_LABELS))
        if strategy.site_labels:
            logger.info("sites by their registered labels: %s", ", ".join(
                f"{label} (node {node})"
                for node, label in sorted(strategy.site_labels.items())))
        recorder = RoundRecorder(cfg=cfg, run_dir=run_dir, strategy=strategy,
                                 evaluator=evaluator, model=model)
        rounds.wait_for_nodes(grid, fed.train_nodes, fed.round_timeout)
        plans = plan_privacy(grid, cfg, run_dir=run_dir,
                             dims=planning.model_dims(cfg, model),
                             timeout=fed.round_timeout,
                             simulated=bool(flat.get(SIMULATED)),
                             labels=strategy.site_labels)
        if not resuming:
            recorder.initial_extra = priors.start_head(
                model, cfg, site_records=[p.records for p in plans])
        initial = records.to_record(exchanged_state(model, cfg.lora))
        if fed.secure_aggregation:
            from fedtune.server.runtime.secagg import run_secagg

            if resuming:  # (SecAgg+ with central DP is refused by the config)
                raise FedtuneError("federation.secure_aggregation runs cannot be "
                                   "resumed: Flower's SecAgg+ workflow keeps no "
                                   "state between rounds for fedtune to restore")
            run_secagg(grid, context, cfg=cfg, initial=exchanged_state(model, cfg.lora),
                       recorder=recorder)
            calibrate(grid, cfg=cfg, run_dir=run_dir, evaluator=evaluator)
            personalize(grid, cfg=cfg, run_dir=run_dir)
            recorder.close()
            return
        done = 0
        if resuming:
            done, initial = resume.resume(run_dir, strategy=strategy, cfg=cfg)
            if recorder.selection is not None:  # the best round so far, the patience
                recorder.selection.replay(checkpoint.read_metrics(run_dir),
                                          past_stop=bool(flat.get(PAST_STOP)))
            recorder.bar.update(done)
        else:
            random.seed(cfg.train.seed)  # Flower samples nodes with `random`
        rounds.run_rounds(grid, strategy, cfg=cfg, run_dir=run_dir, arrays=initial,
                          recorder=recorder, resumed=done)
        calibrate(grid, cfg=cfg, run_dir=run_dir, evaluator=evaluator)
        personalize(grid, cfg=cfg, run_dir=run_dir)  # when train.personalize_epochs
        recorder.close()

    return app


app = make_server_app()
