"""ClientApp: Flower wiring only (training and privacy live in trainer/privacy).

A site's data comes from its node_config: ``data-path`` (a deployed hospital) or, in
simulation, ``partition-id``/``num-partitions`` of ``data.source``. ``device`` in the
node_config picks the accelerator. The reply carries the adapter tensors and scalar
metrics only.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat

from fedtune.client import (
    calibrate,
    personalize,
    policy,
    pooled,
    privacy,
    recipe,
    trainer,
)
from fedtune.client.mods import private_errors, secagg_when_asked
from fedtune.client.site import (
    SiteData,
    resident_model,
    site_data,
    site_ledger,
    site_rank,
)
from fedtune.common import loops, records, updates
from fedtune.common.config import RUN_PATH, RunConfig, from_run_config
from fedtune.common.errors import FedtuneError
from fedtune.common.model import (
    adapter_state,
    exchanged_state,
    frozen_a_digest,
    load_tokenizer,
    set_adapter_state,
    set_adapter_trainable,
    trainable_parameters,
)

logger = logging.getLogger(__name__)
PRIVACY_STATE = "fedtune-privacy"
SITE_LABEL = "site-label"  # node_config: the daemon's --label


def run_config(context: Context, defaults: Mapping[str, Any]) -> RunConfig:
    """The run's config: Flower's run_config over the defaults baked into the app."""
    return from_run_config({**defaults, **context.run_config})


@dataclass
class Setup:
    """What one message needs: config, data, the model with the global adapter."""

    cfg: RunConfig
    site: SiteData
    model: torch.nn.Module
    device: torch.device
    pad: int
    rank: int  # this site's LoRA rank
    received: dict[str, np.ndarray]  # the global adapter at this site's rank


def _checked(context: Context, defaults: Mapping[str, Any], *,
             personalize: bool = False) -> RunConfig:
    """The run's config, declined here if it breaks the site's policy (before any
    record is read: :mod:`fedtune.client.policy`)."""
    cfg = run_config(context, defaults)
    try:
        policy.enforce(policy.of_node(context.node_config), cfg,
                       personalize=personalize)
    except policy.PolicyDeclined as err:
        logger.warning("run %d declined by this site's policy: %s", context.run_id,
                       err)
        raise
    return cfg


_ANNOUNCED: set[int] = set()


def _announce(context: Context) -> None:
    """Once per node and process: the site's node id and label in its own log, so
    the hospital can tie its ledger and logs to the operator's report."""
    if context.node_id in _ANNOUNCED:
        return
    _ANNOUNCED.add(context.node_id)
    label = context.node_config.get(SITE_LABEL)
    logger.info("this site is node %d on the SuperLink%s", context.node_id,
                f" (label {label})" if label else "")


def _setup(msg: Message, context: Context, cfg: RunConfig) -> Setup:
    _announce(context)
    device = loops.resolve_device(str(context.node_config.get("device", "auto")))
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    site = site_data(cfg, context.node_config)
    rank = site_rank(cfg, context.node_config)
    model = resident_model(cfg, rank=rank, device=device)
    received = updates.truncate(
        {k: v.numpy() for k, v in _incoming(msg, model, cfg).items()}, rank)
    set_adapter_state(model, {**adapter_state(model), **{
        k: torch.from_numpy(np.array(v, np.float32)) for k, v in received.items()}})
    pad = load_tokenizer(cfg.model.name_or_path, cfg.model.gguf_file).pad_token_id
    return Setup(cfg, site, model, device, int(pad), rank, received)


def _run_name(context: Context, defaults: Mapping[str, Any]) -> str:
    """The operator's name for the run (its run directory's), as the ledger keeps
    it beside Flower's run id; empty where the server chose none."""
    path = {**defaults, **context.run_config}.get(RUN_PATH)
    return Path(str(path)).name if path else ""


def _floats(values: object) -> list[float]:
    """A ConfigRecord's list of numbers."""
    if not isinstance(values, list):
        raise TypeError(f"expected a list of numbers in the context state, got "
                        f"{type(values).__name__}")
    return [float(v) for v in values]


def _keep(context: Context, guard: privacy.RoundPrivacy) -> None:
    """The site's privacy state (and released histogram) for later rounds; it never
    leaves the site."""
    state: dict[str, Any] = {**guard.state.to_config()}  # Flower's value union
    context.state[PRIVACY_STATE] = ConfigRecord(state)
    if guard.prior is not None:
        context.state[recipe.PRIOR_STATE] = ConfigRecord({"counts": guard.prior})


def _is_secagg(msg: Message) -> bool:
    """A SecAgg+ round: Flower's legacy FitIns format instead of fedtune's."""
    return records.ARRAYS not in msg.content.array_records


def _incoming(msg: Message, model: torch.nn.Module, cfg: RunConfig
              ) -> dict[str, torch.Tensor]:
    """The global adapter a train/evaluate message carries, in either format."""
    if not _is_secagg(msg):
        return records.from_record(msg.content.array_records[records.ARRAYS])
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = sorted(exchanged_state(model, cfg.lora))
    return {n: torch.from_numpy(a.copy()) for n, a in
            zip(names, parameters_to_ndarrays(fitins.parameters), strict=True)}


def _reply(msg: Message, state: dict[str, torch.Tensor], metrics: dict[str, Any],
           label: str = "", weight: int | None = None) -> Message:
    """fedtune's ArrayRecord reply (with the daemon's ``label``, the site's name
    for the operator, where it set one), or a legacy FitRes for
    ``secaggplus_mod`` (which masks the arrays and sends only the masked vector;
    ``weight``: its weight in SecAgg+'s average, default the site's records)."""
    if not _is_secagg(msg):
        content = RecordDict({records.ARRAYS: records.to_record(state),
                              records.METRICS: MetricRecord(metrics)})
        if label:
            content[records.SITE] = ConfigRecord({records.SITE_LABEL: label})
        return Message(content, reply_to=msg)
    params = ndarrays_to_parameters([state[k].detach().cpu().numpy()
                                     for k in sorted(state)])
    fitres = FitRes(status=Status(Code.OK, ""), parameters=params,
                    num_examples=(int(metrics[records.NUM_EXAMPLES]) if weight is None
                                  else weight), metrics=metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _share_round(msg: Message, context: Context, setup: Setup,
                 guard: privacy.RoundPrivacy, rnd: int) -> Message:
    """A distributed-noise round: the site's noise share of one full-batch DP step
    (:mod:`fedtune.client.pooled`), charged before the reply exists; refused
    outside SecAgg+ (a share alone is not private)."""
    cfg = setup.cfg
    if not _is_secagg(msg):
        raise FedtuneError("privacy.noise is distributed but this round is not a "
                           "SecAgg+ round: a site's noise share alone is not "
                           "private, so nothing is released (the server must run "
                           "federation.secure_aggregation)")
    got = pooled.share(setup.model, setup.site.train, cfg=cfg,
                       sigma=guard.noise_multiplier, head_only=guard.head_only,
                       device=setup.device, pad_id=setup.pad,
                       seed=cfg.train.seed * 1000 + rnd,
                       class_weights=guard.terms.weights,
                       logit_bias=guard.terms.logit_bias)
    dp_metrics = guard.charge(steps=1, sigma=got.sigma)
    _keep(context, guard)
    metrics: dict[str, Any] = {
        records.NUM_EXAMPLES: got.records, records.TRAIN_LOSS: got.loss,
        records.DP_STEPS: 1, **dp_metrics, records.TRAINABLE_PARAMS: got.dims}
    if "partition-id" in context.node_config:
        metrics[records.PARTITION] = int(context.node_config["partition-id"])
    logger.info("round %d: %s sent its noise share of one full-batch step on %d "
                "records (noise multiplier %.4g of the sum, loss %.4f), epsilon "
                "%.3f", rnd, setup.site.name, got.records, got.sigma, got.loss,
                dp_metrics.get(records.EPSILON, math.inf))
    return _reply(msg, got.arrays, metrics,
                  label=str(context.node_config.get(SITE_LABEL, "")), weight=1)


def _personalize(msg: Message, context: Context, setup: Setup, round_: int,
                 defaults: Mapping[str, Any]) -> Message:
    """Fine-tune the global adapter on this site, keep it here, reply with scores
    only (:mod:`fedtune.client.personalize`)."""
    cfg, site = setup.cfg, setup.site
    saved = context.state.config_records.get(PRIVACY_STATE)
    run = str(context.run_id)
    scored, state = personalize.fine_tune(
        cfg, site=site, model=setup.model, device=setup.device, pad=setup.pad,
        book=site_ledger(cfg, context.node_config, site),
        saved=dict(saved) if saved is not None else None,
        out=personalize.personal_dir(cfg, context.node_config,
                                     {**defaults, **context.run_config}, run=run),
        run=run, message=msg.metadata.message_id, round_=round_,
        run_name=_run_name(context, defaults),
        check_noise=functools.partial(policy.check_noise,
                                      policy.of_node(context.node_config)))
    context.state[PRIVACY_STATE] = ConfigRecord({**state.to_config()})
    metrics: dict[str, Any] = dict(scored)
    if "partition-id" in context.node_config:
        metrics[records.PARTITION] = int(context.node_config["partition-id"])
    return Message(RecordDict({records.METRICS: MetricRecord(metrics)}), reply_to=msg)


def _calibrate(msg: Message, context: Context, setup: Setup,
               conf: Mapping[str, Any], defaults: Mapping[str, Any]) -> Message:
    """The site's validation counts for the server's candidate decision biases,
    under DP (:mod:`fedtune.client.calibrate`)."""
    cfg = setup.cfg
    k = len(cfg.data.labels)
    flat = _floats(conf[records.DECISION_BIASES])
    if not flat or len(flat) % k:
        raise FedtuneError(f"a calibration message needs K x {k} decision biases, "
                           f"got {len(flat)} numbers")
    saved = context.state.config_records.get(PRIVACY_STATE)
    metrics, state = calibrate.release(
        cfg, model=setup.model, site=setup.site, device=setup.device, pad=setup.pad,
        biases=np.asarray(flat, np.float64).reshape(-1, k),
        book=site_ledger(cfg, context.node_config, setup.site),
        saved=dict(saved) if saved is not None else None, run=str(context.run_id),
        message=msg.metadata.message_id, round_=int(conf[records.SERVER_ROUND]),
        run_name=_run_name(context, defaults))
    context.state[PRIVACY_STATE] = ConfigRecord({**state.to_config()})
    if "partition-id" in context.node_config:
        metrics[records.PARTITION] = int(context.node_config["partition-id"])
    return Message(RecordDict({records.METRICS: MetricRecord(metrics)}), reply_to=msg)


def make_client_app(defaults: Mapping[str, Any] | None = None, *,
                    mods: Sequence[Mod] = (), secagg: bool = True) -> ClientApp:
    """A ClientApp; ``defaults`` is a flat run_config used under Flower's (simulation
    runs started from Python carry an empty one); ``mods`` run outside fedtune's.
    ``secagg=False``: SecAgg+ masking happens elsewhere (the site worker runs the
    training step of a round the forwarder's ``secaggplus_mod`` masks)."""
    defaults = dict(defaults or {})
    app = ClientApp(mods=[*mods, *([secagg_when_asked] if secagg else [])])

    @app.train()
    @private_errors
    def train(msg: Message, context: Context) -> Message:
        setup = _setup(msg, context, _checked(context, defaults))
        cfg, site, model, device, pad = (setup.cfg, setup.site, setup.model,
                                         setup.device, setup.pad)
        conf: Mapping[str, Any] = ({} if _is_secagg(msg) else
                                   msg.content.config_records[records.CONFIG])
        rnd = (int(msg.metadata.group_id) if _is_secagg(msg) else
               int(conf[records.SERVER_ROUND]))
        saved = context.state.config_records.get(PRIVACY_STATE)
        prior = context.state.config_records.get(recipe.PRIOR_STATE)
        book = site_ledger(cfg, context.node_config, site)
        guard = privacy.open_round(
            cfg, num_examples=len(site.train), round_=rnd,
            labels=lambda: [int(x["labels"]) for x in site.train.items],
            saved=dict(saved) if saved is not None else None,
            prior=_floats(prior["counts"]) if prior is not None else None,
            book=book, resumed_at=int(conf.get(records.RESUMED_AT, 0)),
            run=str(context.run_id), message=msg.metadata.message_id,
            seed=cfg.train.seed * 1000 + rnd, run_name=_run_name(context, defaults),
            check_noise=functools.partial(policy.check_noise,
                                          policy.of_node(context.node_config)))
        _keep(context, guard)  # the histogram's release stands even if training fails
        set_adapter_trainable(model, cfg.lora, trainable=not guard.head_only)
        if cfg.privacy.noise == "distributed":
            return _share_round(msg, context, setup, guard, rnd)
        mu = float(conf.get(records.PROXIMAL_MU, 0.0))  # FedProx
        res = trainer.train_local(
            model, site.train, site.val, task=cfg.model.task,
            train_cfg=guard.train_cfg, privacy_cfg=cfg.privacy,
            noise_multiplier=guard.noise_multiplier, sample_rate=guard.sample_rate,
            device=device, pad_id=pad, seed=cfg.train.seed * 1000 + rnd,
            proximal_mu=mu, class_weights=guard.terms.weights,
            logit_bias=guard.terms.logit_bias, head_only=guard.head_only,
            top_layers=cfg.lora.top_layers)
        dp_metrics = guard.charge(steps=res.steps)
        _keep(context, guard)
        eps = dp_metrics.get(records.EPSILON, math.inf)
        metrics = {
            records.NUM_EXAMPLES: res.num_examples, records.TRAIN_LOSS: res.train_loss,
            records.TRAIN_SECONDS: res.seconds, records.DP_STEPS: res.steps,
        }
        if dp_metrics:  # no epsilon key at all = not private
            metrics.update({**dp_metrics,
                            records.TRAINABLE_PARAMS: trainable_parameters(model)})
        if cfg.lora.ffa:
            metrics[records.LORA_A_DIGEST] = frozen_a_digest(model)
        if "partition-id" in context.node_config:  # a simulated site: its index,
            # so the operator can match a node id to "partition k/N" in the log
            metrics[records.PARTITION] = int(context.node_config["partition-id"])
        # Every site sends the same metric keys (Flower aggregates only consistent
        # replies); the local validation loss stays on the site, in its log.
        logger.info("round %d: %s trained %d steps on %d examples (%s%s), "
                    "loss %.4f, val loss %.4f, epsilon %.3f", rnd, site.name,
                    res.steps, res.num_examples,
                    "head only" if guard.head_only else f"LoRA rank {setup.rank}",
                    f", proximal mu {mu:g}" if mu else "", res.train_loss,
                    res.val_loss, eps)
        out = exchanged_state(model, cfg.lora, head_only=cfg.exchanges_head_only(rnd))
        if not _is_secagg(msg) and cfg.federation.compression != "none":
            out = {k: torch.from_numpy(v) for k, v in updates.encode(
                {k: v.numpy() for k, v in out.items()}, setup.received,
                cfg.federation.compression).items()}
        return _reply(msg, out, metrics,
                      label=str(context.node_config.get(SITE_LABEL, "")))

    @app.query()
    @private_errors
    def query(msg: Message, context: Context) -> Message:
        """The site's number of training records (the planner's input): the same
        figure every training reply carries as ``num-examples``; or the class
        histogram it released under DP for its logit adjustment (the calibration's
        prior: post-processing of that release, no further privacy cost)."""
        conf: Mapping[str, Any] = msg.content.config_records.get(
            records.CONFIG, ConfigRecord())
        if conf.get(records.QUERY) == records.CLASS_COUNTS:
            prior = context.state.config_records.get(recipe.PRIOR_STATE)
            if prior is None:
                raise FedtuneError("this site has released no class histogram in "
                                   "this run (it trained no round)")
            return Message(RecordDict({records.METRICS: MetricRecord(
                {records.CLASS_COUNTS: _floats(prior["counts"])})}), reply_to=msg)
        if conf.get(records.QUERY) != records.SITE_SIZE:
            raise FedtuneError(f"unknown query {conf.get(records.QUERY)!r}")
        site = site_data(_checked(context, defaults), context.node_config)
        return Message(RecordDict({records.METRICS: MetricRecord(
            {records.NUM_EXAMPLES: len(site.train)})}), reply_to=msg)

    @app.evaluate()
    @private_errors
    def evaluate(msg: Message, context: Context) -> Message:
        conf: Mapping[str, Any] = msg.content.config_records.get(records.CONFIG,
                                                                 ConfigRecord())
        setup = _setup(msg, context, _checked(
            context, defaults, personalize=bool(conf.get(records.PERSONALIZE))))
        cfg, site, model, device, pad = (setup.cfg, setup.site, setup.model,
                                         setup.device, setup.pad)
        if conf.get(records.PERSONALIZE):
            return _personalize(msg, context, setup, int(conf[records.SERVER_ROUND]),
                                defaults)
        if conf.get(records.CALIBRATE):
            return _calibrate(msg, context, setup, conf, defaults)
        ds = site.val if len(site.val) else site.train
        metrics: dict[str, Any] = {records.NUM_EXAMPLES: len(ds), **personalize.scores(
            cfg, model, ds, device=device, pad=pad)}
        return Message(RecordDict({records.METRICS: MetricRecord(metrics)}),
                       reply_to=msg)

    return app
