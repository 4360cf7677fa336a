"""Evaluation loops and the per-record loss: pure torch, shared by the site
(training, local validation) and the server (central evaluation, the audit).

No Flower, no Opacus: the server imports this module without any client code.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedtune.common import metrics
from fedtune.common.data import collate
from fedtune.common.errors import ConfigError

Batch = dict[str, torch.Tensor]  # one record, or a collated batch of them


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device
    (``cpu``, ``cuda``, ``cuda:N``, ``mps``), which must be present here: the one
    device check of the site worker, the server and ``fedtune client``."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device; use auto, cpu, cuda or "
                          "cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: no CUDA device is visible here (CUDA "
                              "is not available); use cpu or fix the driver")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} "
                              "CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps': MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r}: use auto, cpu, cuda[:N] or mps")
    return dev


def autocast(device: torch.device, precision: str, *, dp: bool
             ) -> AbstractContextManager[object]:
    """Mixed precision: bf16 on CUDA where supported (``auto``), else full fp32."""
    if precision == "auto":
        precision = ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported()
                     else "fp32")
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and dp:
        raise ConfigError("train.precision: fp16 needs loss scaling, which DP-SGD's "
                          "per-sample clipping does not support; use bf16 or fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def per_sample_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, task: str,
                    logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of each sequence in the batch, shape ``[B]``.

    Causal LM: token losses summed over the response tokens divided by their count
    (HF's ``labels=`` loss averages over all tokens of the batch, which mixes samples
    and breaks per-sample gradients).

    ``logit_bias`` (classification, training only): added to the logits before the
    loss, ``tau * log(prior)`` for logit-adjusted training.
    """
    if task == "classification":
        logits = class_logits(model, batch)
        if logit_bias is not None:
            logits = logits + logit_bias.to(logits.device)
        return F.cross_entropy(logits, batch["labels"], reduction="none")
    logits = forward(model, batch).logits[:, :-1]
    target = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:]
    tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                          target.reshape(-1), reduction="none").view(target.shape)
    return (tok * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def to_device(batch: dict[str, torch.Tensor], device: torch.device
        ) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward(model: nn.Module, batch: Batch) -> Any:
    """The model's output for a collated batch: token ids through the whole model,
    or the cached hidden states (``hidden``) through its top layers
    (:class:`fedtune.common.toplayers.TopLayers`)."""
    if "hidden" in batch:
        return model(hidden=batch["hidden"], attention_mask=batch["attention_mask"])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def class_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """A classifier's fp32 logits for a collated batch: cached pooled features
    (``features``) through the head alone, else :func:`forward`."""
    if "features" in batch:
        return model(batch["features"]).float()  # type: ignore[no-any-return]  # nn.Module
    return forward(model, batch).float()  # type: ignore[no-any-return]  # (same)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset[Batch], *, task: str, batch_size: int,
             device: torch.device, pad_id: int, labels: list[str] | None = None,
             precision: str = "auto", logit_bias: torch.Tensor | None = None
             ) -> dict[str, float]:
    """Loss (+ accuracy, macro-F1, per-class recall | perplexity) on a dataset.

    A classifier's dataset holds token ids, or cached pooled features for its head
    (:func:`fedtune.common.features.head_features`, ``model`` then the head).
    ``logit_bias``: a calibrated decision bias added to the logits (loss and
    prediction)."""
    if len(dataset) == 0:  # type: ignore[arg-type]  # torch's Dataset declares no __len__
        return {}
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size,
                        collate_fn=functools.partial(collate, pad_id=pad_id))
    total, weight, y_true, y_pred = 0.0, 0.0, [], []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, precision, dp=False):
            if task == "classification":
                logits = class_logits(model, batch)
                if logit_bias is not None:
                    logits = logits + logit_bias.to(logits.device)
                total += F.cross_entropy(logits, batch["labels"],
                                         reduction="sum").item()
                weight += len(batch["labels"])
                y_true += batch["labels"].tolist()
                y_pred += logits.argmax(-1).tolist()
            else:
                n_tok = batch["loss_mask"][:, 1:].sum(1)
                losses = per_sample_loss(model, batch, task=task)
                total += (losses * n_tok).sum().item()
                weight += n_tok.sum().item()
    model.train(was_training)
    loss = total / max(weight, 1.0)
    if task != "classification":
        return {"loss": loss, "perplexity": metrics.perplexity(loss)}
    names = labels or [str(i) for i in range(int(max(y_true + y_pred)) + 1)]
    return {"loss": loss, **metrics.classification_report(y_true, y_pred,
                                                          labels=names)}
