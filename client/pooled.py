"""A site's round under distributed noise (``privacy.noise: distributed``): one
full-batch DP step whose noise the sites pool under SecAgg+.

The site sums its records' gradients of the global adapter, each clipped to
``privacy.max_grad_norm`` (and weighed by at most 1 after clipping: the class
weights), adds its share of the noise on SecAgg+'s integer grid
(:class:`fedtune.common.distributed_noise.Mechanism`), and sends that: never a
model, never a share outside a SecAgg+ round. The server unmasks only the sum of
at least ``n - t`` shares and takes the optimizer step
(:mod:`fedtune.server.runtime.pooled`).
"""

from __future__ import annotations

import functools
import logging
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedtune.client import dpsgd
from fedtune.client.trainer import trained_view
from fedtune.common.config import RunConfig
from fedtune.common.data import collate
from fedtune.common.loops import Batch, autocast, per_sample_loss, to_device
from fedtune.common.model import adapter_values
from fedtune.common.planning import mechanism

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Share:
    """What the site sends: its noised clipped-gradient sum on the grid, in the
    adapter state's names (float64: the grid's points exactly), and what it cost.
    ``clipped``: coordinates the per-coordinate box cut (stays on the site)."""

    arrays: dict[str, torch.Tensor]
    sigma: float
    loss: float
    records: int
    clipped: int
    dims: int


def clipped_sum(trained: nn.Module, dataset: Dataset[Batch], *, cfg: RunConfig,
                device: torch.device, pad_id: int,
                class_weights: torch.Tensor | None = None,
                logit_bias: torch.Tensor | None = None
                ) -> tuple[dict[int, torch.Tensor], float]:
    """(each trainable parameter's sum of per-record gradients clipped to
    ``max_grad_norm`` and weighed after clipping, keyed by ``id``; the mean
    loss): Opacus' per-sample gradients, accumulated over the whole set by its
    skipped-step mechanism (no noise, no optimizer step)."""
    params = [p for p in trained.parameters() if p.requires_grad]
    net = dpsgd.wrap(trained, cfg.privacy.grad_sample_mode)
    opt = dpsgd.WeightedDPOptimizer(
        torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0,
        max_grad_norm=cfg.privacy.max_grad_norm,
        expected_batch_size=max(1, len(dataset)),  # type: ignore[arg-type]  # Sized
        loss_reduction="mean")
    loader = DataLoader(dataset, batch_size=cfg.train.eval_batch_size,
                        collate_fn=functools.partial(collate, pad_id=pad_id))
    loss_sum, seen = 0.0, 0
    trained.to(device).train()
    try:
        for raw in loader:
            batch = to_device(raw, device)
            with autocast(device, cfg.train.precision, dp=True):
                losses = per_sample_loss(net, batch, task=cfg.model.task,
                                         logit_bias=logit_bias)
            opt.sample_weights = (class_weights.to(device)[batch["labels"]]
                                  if class_weights is not None else None)
            losses.mean().backward()  # type: ignore[no-untyped-call]  # torch
            opt.signal_skip_step(do_skip=True)  # accumulate: Opacus' virtual step
            opt.step()
            opt.zero_grad(set_to_none=True)  # keeps summed_grad after a skip
            loss_sum, seen = loss_sum + float(losses.detach().sum()), seen + len(losses)
        sums = {id(p): (p.summed_grad if p.summed_grad is not None  # type: ignore[attr-defined]  # Opacus' attribute
                        else torch.zeros_like(p)).detach().clone() for p in params}
    finally:
        net._close()  # type: ignore[operator]  # remove Opacus hooks
        for p in params:
            p.summed_grad = None  # type: ignore[attr-defined]  # Opacus' attribute
    return sums, loss_sum / max(seen, 1)


def share(model: nn.Module, train_set: Dataset[Batch], *, cfg: RunConfig,
          sigma: float, head_only: bool, device: torch.device, pad_id: int,
          seed: int, class_weights: torch.Tensor | None = None,
          logit_bias: torch.Tensor | None = None) -> Share:
    """The site's share of a distributed-noise round on the global adapter the
    model holds; ``sigma``: the noise multiplier the sum must carry."""
    trained, records, _ = trained_view(
        model, train_set, None, device=device, pad_id=pad_id,
        batch_size=cfg.train.eval_batch_size, head_only=head_only,
        top_layers=cfg.lora.top_layers)
    sums, loss = clipped_sum(trained, records, cfg=cfg, device=device, pad_id=pad_id,
                             class_weights=class_weights, logit_bias=logit_bias)
    state = adapter_values(model, sums)
    names = sorted(state)
    ids = {id(p) for p in trained.parameters() if p.requires_grad}
    flat = [state[n].reshape(-1).double().numpy() for n in names]
    mask = _trained_mask(model, names, ids)
    dims = int(sum(f.size for f, m in zip(flat, mask, strict=True) if m))
    mech = mechanism(cfg, sigma=sigma, dims=dims)
    rng = np.random.default_rng(secrets.randbits(128) if cfg.privacy.secure_noise
                                else seed)
    noised, clipped = mech.encode(
        np.concatenate([f for f, m in zip(flat, mask, strict=True) if m]), rng)
    out, at = {}, 0
    for name, f, m in zip(names, flat, mask, strict=True):
        if m:  # a trained tensor: its share; a frozen one: exact zeros, no noise
            out[name] = torch.from_numpy(noised[at:at + f.size].reshape(
                state[name].shape).copy())
            at += f.size
        else:
            out[name] = torch.zeros(state[name].shape, dtype=torch.float64)
    if clipped:
        logger.warning("distributed noise: the per-coordinate box +-%.4g cut %d of "
                       "%d gradient-sum coordinates (biased, still private); raise "
                       "federation.secagg_clipping_range", mech.data_bound, clipped,
                       dims)
    charged = mech.charged_sigma()
    if charged < sigma:
        logger.warning("distributed noise: the shares carry noise multiplier %.6g, "
                       "below the planned %.6g; charged at %.6g", charged, sigma,
                       charged)
    return Share(arrays=out, sigma=charged, loss=loss,
                 records=len(train_set),  # type: ignore[arg-type]  # Sized
                 clipped=clipped, dims=dims)


def _trained_mask(model: nn.Module, names: list[str], ids: set[int]) -> list[bool]:
    """Which adapter-state names are trained this round (by the model's own
    parameters' identity, through the same name mapping)."""
    marks = adapter_values(model, {i: torch.ones(1) for i in ids})
    return [marks[n].numel() > 0 and float(marks[n].reshape(-1)[0]) == 1.0
            for n in names]
