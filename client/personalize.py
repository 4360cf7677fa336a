"""Personalisation on the site: local fine-tuning of the global model under DP.

The method is FedAvg + local fine-tuning ("FT", Wang et al. 2019; Yu, Bagdasaryan
and Shmatikov 2020): after the federation each site starts from the best global
adapter and trains on its own records for ``train.personalize_epochs`` with
DP-SGD whose noise is calibrated to ``privacy.personalize_epsilon``. The release
is checked against and charged to the site's ledger like a round, and composed
into the run's accountant. The personalised adapter is saved on the site and
never sent: the reply carries only the site's own held-out scores (its
validation split) with the global adapter and with the personalised one, and the
epsilon spent.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fedtune.client import trainer
from fedtune.client.privacy import PrivacyState
from fedtune.client.releases import PERSONALISATION, Book, Releases
from fedtune.client.site import SiteData
from fedtune.common import loops, records
from fedtune.common.accounting import (
    calibrate_noise,
    epsilon_spent,
    sample_rate,
    steps_per_round,
)
from fedtune.common.config import RUN_PATH, RunConfig, dump_yaml
from fedtune.common.data import EncodedDataset
from fedtune.common.model import RUN_CONFIG, save_adapter, set_adapter_trainable

logger = logging.getLogger(__name__)
PERSONAL_DIR = "personalised"

# The head's personalisation learning rate (with AdamW) when
# train.personalize_learning_rate is 0: at 0.1 the DP noise undid the gain
# (bench/README.md, section 8).
HEAD_LEARNING_RATE = 0.02


def scores(cfg: RunConfig, model: torch.nn.Module, dataset: EncodedDataset, *,
           device: torch.device, pad: int) -> dict[str, float]:
    """The fixed keys a site reports about an adapter on its own records (per-class
    figures would vary with the classes a site holds)."""
    res = loops.evaluate(model, dataset, task=cfg.model.task, device=device,
                              batch_size=cfg.train.eval_batch_size, pad_id=pad,
                              labels=list(cfg.data.labels))
    keys = ((records.ACCURACY, records.MACRO_F1)
            if cfg.model.task == "classification" else (records.PERPLEXITY,))
    return {records.EVAL_LOSS: res["loss"], **{k: res[k] for k in keys}}


def personal_dir(cfg: RunConfig, node_config: Mapping[str, Any],
                 run_config: Mapping[str, Any], *, run: str) -> Path:
    """Where the site keeps its personalised adapter: beside its ledger
    (deployment), else in the simulated site's folder of the run directory."""
    if "ledger-dir" in node_config:
        return Path(str(node_config["ledger-dir"])) / PERSONAL_DIR / f"run-{run}"
    part = node_config.get("partition-id")
    root = Path(str(run_config.get(RUN_PATH) or cfg.federation.run_dir))
    return root / "sites" / f"p{part}" / PERSONAL_DIR


def fine_tune(cfg: RunConfig, *, site: SiteData, model: torch.nn.Module,
              device: torch.device, pad: int, book: Book | None,
              saved: Mapping[str, Any] | None, out: Path, run: str, message: str,
              round_: int, run_name: str = "",
              check_noise: Callable[[list[float]], None] | None = None
              ) -> tuple[dict[str, float], PrivacyState]:
    """Score the global adapter, fine-tune it, score the result, keep it in
    ``out``; returns the reply's metrics and the run's privacy state with the
    personalisation composed in."""
    if not len(site.val):
        raise ValueError("personalisation needs a local held-out split to score on "
                         "(data.val_fraction > 0)")
    last = cfg.federation.num_rounds  # (the recipe's personalisation rate below)
    head_only = cfg.head_only(last)
    phase = cfg.phase(last, len(site.train))
    measured = head_only and not cfg.train.personalize_learning_rate
    train_cfg = dataclasses.replace(
        phase, local_epochs=cfg.train.personalize_epochs, max_steps=0,
        epoch_patience=0,
        learning_rate=cfg.train.personalize_learning_rate or (
            HEAD_LEARNING_RATE if head_only else phase.learning_rate),
        # the head's personalisation rate was measured with AdamW
        optimizer="adamw" if measured else phase.optimizer)
    dp = cfg.privacy.enabled
    q = sample_rate(batch_size=train_cfg.batch_size, num_examples=len(site.train))
    steps = steps_per_round(q=q, epochs=train_cfg.local_epochs,
                            max_steps=0)
    sigma = calibrate_noise(
        target_epsilon=cfg.privacy.personalize_epsilon,
        target_delta=cfg.privacy.target_delta, sample_rate=q, steps=steps,
        accountant=cfg.privacy.accountant) if dp else 0.0
    state = PrivacyState.from_config(dict(saved) if saved is not None else None)
    releases = Releases(cfg.privacy, state.history, book, run=run, round_=round_,
                        message=message, run_name=run_name, check_noise=check_noise)
    releases.check(PERSONALISATION, (sigma, q, steps), noise=[sigma])
    before = scores(cfg, model, site.val, device=device, pad=pad)
    set_adapter_trainable(model, cfg.lora, trainable=not head_only)
    res = trainer.train_local(
        model, site.train, EncodedDataset([]), task=cfg.model.task,
        train_cfg=train_cfg, privacy_cfg=cfg.privacy, noise_multiplier=sigma,
        sample_rate=q, device=device, pad_id=pad, seed=cfg.train.seed * 1000 + 999,
        head_only=head_only, top_layers=cfg.lora.top_layers)
    metrics: dict[str, float] = {records.NUM_EXAMPLES: len(site.val),
                                 records.DP_STEPS: res.steps,
                                 records.TRAIN_SECONDS: res.seconds}
    releases.charge(PERSONALISATION, (sigma, q, res.steps))
    if dp:
        metrics.update({
            records.PERSONAL_EPSILON: epsilon_spent(
                [(sigma, q, res.steps)], delta=cfg.privacy.target_delta,
                accountant=cfg.privacy.accountant),
            **releases.metrics(), records.NOISE_MULTIPLIER: sigma})
    after = scores(cfg, model, site.val, device=device, pad=pad)
    _keep(model, out, cfg=cfg, meta={"personalised": True, "round": round_,
                                      "epsilon": metrics.get(records.PERSONAL_EPSILON)})
    metrics.update({records.GLOBAL + k: v for k, v in before.items()})
    metrics.update({records.PERSONAL + k: v for k, v in after.items()})
    logger.info("personalised %s (%d DP-SGD steps, %s): %s -> %s on its own %d "
                "held-out records; kept in %s", site.name, res.steps,
                f"epsilon {metrics[records.PERSONAL_EPSILON]:.3f}" if dp else "DP off",
                _words(before), _words(after), len(site.val), out)
    return metrics, state


def _words(score: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in score.items())


def _keep(model: torch.nn.Module, out: Path, *, cfg: RunConfig,
          meta: dict[str, Any]) -> None:
    """Save the personalised adapter (PEFT format + the run's config, so `fedtune
    predict DIR` runs it), replacing an earlier one only once complete."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(model, tmp, meta={"task": cfg.model.task,
                                   "base_model": cfg.model.name_or_path,
                                   "labels": list(cfg.data.labels), **meta})
    (tmp / RUN_CONFIG).write_text(dump_yaml(cfg), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
