"""Local training and evaluation loops (plain torch + Opacus; no Flower).

One call of :func:`train_local` is one site's work in one round: AdamW with a linear
warmup/decay schedule, epochs or a step budget, optional early stopping on the local
validation split, and either DP-SGD (Poisson sampling, per-sample clipping, Gaussian
noise) or ordinary gradient-norm clipping.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from fedtune.client import dpsgd
from fedtune.common.accounting import sample_rate as poisson_rate
from fedtune.common.config import PrivacyConfig, TrainConfig
from fedtune.common.data import collate
from fedtune.common.features import HeadOnly, head_features, hidden_inputs
from fedtune.common.loops import (
    Batch,
    autocast,
    evaluate,
    per_sample_loss,
    to_device,
)
from fedtune.common.model import adapter_state, classifier_head, set_adapter_state
from fedtune.common.toplayers import TopLayers

logger = logging.getLogger(__name__)
VSet = TypeVar("VSet", Dataset[Batch], None)


@dataclass(frozen=True)
class TrainResult:
    """What one local round did (scalars only)."""

    num_examples: int
    train_loss: float
    val_loss: float
    steps: int
    seconds: float
    sample_rate: float


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty())


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig
                   ) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum (under heavy DP noise SGD moves each noise-only
    coordinate by lr * noise, where Adam's normalised step moves it by ~lr)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate,
                             weight_decay=cfg.weight_decay)


def _loader(dataset: Dataset[Batch], *, cfg: TrainConfig, dp: bool, pad_id: int,
            generator: torch.Generator, rate: float | None
            ) -> tuple[DataLoader[Batch], float]:
    n = len(dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__
    col = functools.partial(collate, pad_id=pad_id)
    if rate is None:
        rate = poisson_rate(batch_size=cfg.batch_size, num_examples=n)
    if dp:
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=rate,
                                                generator=generator)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=col), rate
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                      collate_fn=col, generator=generator), rate


def proximal_step(params: list[nn.Parameter], anchor: list[torch.Tensor], *,
                  lr: float, mu: float) -> None:
    """FedProx's proximal term ``mu/2 * ||w - w_global||^2`` as a decoupled step
    ``w -= lr * mu * (w - w_global)`` after each optimizer step.

    It depends only on the weights and the public global adapter, never on a
    record, so under DP-SGD it is post-processing (adding it to the loss instead
    would be silently dropped: Opacus steps with the per-sample gradients only).
    """
    with torch.no_grad():
        for p, a in zip(params, anchor, strict=True):
            p.add_(p - a, alpha=-lr * mu)


def _seeds(seed: int, *, dp: bool, secure: bool) -> tuple[int, int]:
    """Seeds of the batch sampler and of the DP noise. Under DP with secure noise
    both come from the OS's entropy: a seed in the (public) config would let anyone
    regenerate the noise and the Poisson batches."""
    if dp and secure:
        return secrets.randbits(62), secrets.randbits(62)
    return seed, seed + 1


def train_local(model: nn.Module, train_set: Dataset[Batch], val_set: Dataset[Batch], *,
                task: str, train_cfg: TrainConfig, privacy_cfg: PrivacyConfig,
                noise_multiplier: float, device: torch.device, pad_id: int,
                seed: int, sample_rate: float | None = None, proximal_mu: float = 0.0,
                class_weights: torch.Tensor | None = None,
                logit_bias: torch.Tensor | None = None,
                head_only: bool = False, top_layers: int = 0) -> TrainResult:
    """Train the model's adapter in place for one round; see module docstring.

    ``proximal_mu > 0`` adds FedProx's proximal step (:func:`proximal_step`)
    towards the adapter the round started from. ``class_weights`` (one weight in
    [0, 1] per class) weigh each record's clipped gradient (DP) or its loss (no
    DP); ``logit_bias`` is added to the logits in the training loss only.
    ``head_only`` (classification, LoRA frozen) trains the head on the cached
    pooled features (:func:`fedtune.common.features.head_features`).
    ``top_layers`` (k > 0, LoRA on the top k layers only): train and validate
    the top k layers on each record's cached hidden states entering them
    (:mod:`fedtune.common.toplayers`).
    ``sample_rate``: the Poisson rate the round's privacy was planned with (None:
    batch size over records).
    """
    start = time.perf_counter()
    trained, train_set, val_set = trained_view(
        model, train_set, val_set, device=device, pad_id=pad_id,
        batch_size=train_cfg.eval_batch_size, head_only=head_only,
        top_layers=top_layers)
    scored = trained  # what the validation loss runs through
    dp = privacy_cfg.enabled
    sample_seed, noise_seed = _seeds(seed, dp=dp, secure=privacy_cfg.secure_noise)
    gen = torch.Generator().manual_seed(sample_seed)
    loader, rate = _loader(train_set, cfg=train_cfg, dp=dp, pad_id=pad_id,
                           generator=gen, rate=sample_rate)
    per_epoch = len(loader)
    total = (train_cfg.max_steps if train_cfg.max_steps > 0
             else train_cfg.local_epochs * per_epoch)
    model.to(device).train()
    params = [p for p in trained.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    opt = make_optimizer(params, train_cfg)
    net: nn.Module = trained
    if dp:
        net, opt = dpsgd.make_private(
            trained, opt, cfg=privacy_cfg, noise_multiplier=noise_multiplier,
            expected_batch_size=round(rate * len(train_set)),  # type: ignore[arg-type]  # Sized
            generator=torch.Generator(device=device).manual_seed(noise_seed))
    sched = get_linear_schedule_with_warmup(  # type: ignore[no-untyped-call]  # (untyped)
        opt, num_warmup_steps=int(train_cfg.warmup_ratio * total),
        num_training_steps=total)
    steps, loss_sum, loss_n, best, stale = 0, 0.0, 0, math.inf, 0
    best_state = None
    before, top_lr = adapter_state(model), 0.0  # the once-a-round check that it moved
    bar = _progress(total, "local steps")
    try:
        while steps < total:
            for batch in loader:
                if steps >= total:
                    break
                loss = train_step(net, opt, to_device(batch, device), task=task, dp=dp,
                                  cfg=train_cfg, device=device, params=params,
                                  class_weights=class_weights, logit_bias=logit_bias)
                lr = float(opt.param_groups[0]["lr"])
                top_lr = max(top_lr, lr)
                if anchor:
                    proximal_step(params, anchor, mu=proximal_mu, lr=lr)
                sched.step()
                steps += 1
                bar.update(1)
                if loss is not None:
                    loss_sum, loss_n = loss_sum + loss, loss_n + 1
            if train_cfg.epoch_patience and len(val_set):  # type: ignore[arg-type]  # Sized
                val = evaluate(scored, val_set, task=task, device=device,
                               pad_id=pad_id, batch_size=train_cfg.eval_batch_size
                               )["loss"]
                if val < best - 1e-4:
                    best, stale, best_state = val, 0, adapter_state(model)
                else:
                    stale += 1
                    if stale >= train_cfg.epoch_patience:
                        logger.info("early stopping after %d steps (val loss %.4f)",
                                    steps, best)
                        break
    finally:
        bar.close()
        if dp:
            net._close()  # type: ignore[operator]  # remove Opacus hooks
    if top_lr > 0:
        check_moved(before, adapter_state(model), steps=steps, dp=dp, device=device)
    if best_state is not None:
        set_adapter_state(model, best_state)
    val_loss = (evaluate(scored, val_set, task=task, device=device, pad_id=pad_id,
                         batch_size=train_cfg.eval_batch_size)["loss"]
                if len(val_set) else math.nan)  # type: ignore[arg-type]  # Sized
    return TrainResult(num_examples=len(train_set),  # type: ignore[arg-type]  # Sized
                       train_loss=loss_sum / max(loss_n, 1), val_loss=val_loss,
                       steps=steps, seconds=time.perf_counter() - start,
                       sample_rate=rate if dp else 0.0)


def trained_view(model: nn.Module, train_set: Dataset[Batch],
                 val_set: VSet, *, device: torch.device, pad_id: int,
                 batch_size: int, head_only: bool, top_layers: int
                 ) -> tuple[nn.Module, Dataset[Batch], VSet]:
    """(the module a round trains, its train and validation sets (None stays
    None)): the model on its records; the head on cached pooled features
    (``head_only``); or the top ``top_layers`` layers on the cached hidden states
    entering them."""
    view: nn.Module
    if head_only:  # the encoder is frozen: train and validate on its cached output
        view = HeadOnly(classifier_head(model)[1])

        def cached(ds: Any) -> Any:
            return head_features(model, ds, device=device, pad_id=pad_id,
                                 batch_size=batch_size, top_layers=top_layers)
    elif top_layers:  # the layers below are frozen: start from their cached output
        top = view = TopLayers(model, top_layers)
        _all_trained(model, top)

        def cached(ds: Any) -> Any:
            return hidden_inputs(model, ds, layer=top.first, device=device,
                                 pad_id=pad_id, batch_size=batch_size)
    else:
        return model, train_set, val_set
    return view, cached(train_set), None if val_set is None else cached(val_set)


class NoOpStep(RuntimeError):
    """The optimizer's steps left the adapter where it was: a silent failure."""


def check_moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], *,
                steps: int, dp: bool, device: torch.device) -> None:
    """Fail loudly when a round's steps (at a learning rate above 0) left every
    adapter tensor unchanged: with some Opacus/peft combinations the optimizer
    updates copies of the parameters, not the model's (Opacus #820, peft #3409),
    while the loss and epsilon look normal. Under DP every step adds noise, so
    an unmoved adapter is never a legitimate result."""
    if any(not torch.equal(before[k], after[k]) for k in after):
        return
    raise NoOpStep(
        f"{steps} {'DP-SGD ' if dp else ''}optimizer step(s) on {device} left every "
        "adapter tensor unchanged: the optimizer is not updating the model's own "
        "parameters (a known failure of some Opacus/peft versions on CUDA: Opacus "
        "#820, peft #3409). Nothing of this round is sent; check the installed "
        "opacus and peft against pyproject.toml, or try --device cpu")


def _all_trained(model: nn.Module, top: TopLayers) -> None:
    """Refuse a top-layers view that would leave a trainable tensor untouched
    (LoRA below the top layers: the cached states assume none there)."""
    inside = {id(p) for p in top.parameters() if p.requires_grad}
    left = [n for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in inside]
    if left:
        raise ValueError(f"lora.top_layers={top.k} leaves trainable tensors below "
                         f"the top layers, e.g. {left[:3]}; build the model with "
                         "the same lora.top_layers")


def train_step(net: nn.Module, opt: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor], *, task: str, dp: bool,
               cfg: TrainConfig, device: torch.device, params: list[nn.Parameter],
               class_weights: torch.Tensor | None = None,
               logit_bias: torch.Tensor | None = None) -> float | None:
    """One optimizer step; returns the batch loss (None for an empty Poisson batch).

    Under DP the record weights go to the optimizer, which applies them after
    clipping (:class:`~fedtune.client.dpsgd.WeightedDPOptimizer`).
    """
    opt.zero_grad(set_to_none=True)
    if next(iter(batch.values())).shape[0] == 0:
        # Poisson sampling drew no record: the step still counts (and adds noise).
        for p in params:
            p.grad_sample = torch.zeros(  # type: ignore[attr-defined]  # Opacus' attribute
                (0, *p.shape), device=p.device, dtype=p.dtype)
        opt.step()
        return None
    weights = (class_weights.to(device)[batch["labels"]]
               if class_weights is not None else None)
    with autocast(device, cfg.precision, dp=dp):
        losses = per_sample_loss(net, batch, task=task, logit_bias=logit_bias)
    loss = losses.mean()
    if dp:
        opt.sample_weights = weights  # type: ignore[attr-defined]  # WeightedDPOptimizer
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    else:
        weighted = loss if weights is None else (losses * weights).mean()
        weighted.backward()  # type: ignore[no-untyped-call]  # (same)
    if not dp:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    opt.step()
    return float(loss.detach())
