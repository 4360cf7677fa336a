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
from peft import PeftType
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
    and breaks per-sample gradients); the LM head runs at those positions only
    (:func:`response_logits`).

    ``logit_bias`` (classification, training only): added to the logits before the
    loss, ``tau * log(prior)`` for logit-adjusted training.
    """
    if task == "classification":
        logits = class_logits(model, batch)
        if logit_bias is not None:
            logits = logits + logit_bias.to(logits.device)
        return F.cross_entropy(logits, batch["labels"], reduction="none")
    mask = batch["loss_mask"][:, 1:]
    read = mask > 0
    logits, rows = response_logits(model, batch, read)
    target = batch["input_ids"][:, 1:][read]
    tok = F.cross_entropy(logits.float(), target, reduction="none") * mask[read]
    total = torch.zeros(len(mask), dtype=tok.dtype, device=tok.device)
    return total.index_add(0, rows, tok) / mask.sum(1).clamp(min=1.0)


class _Deferred(nn.Module):
    """Stands in for a causal LM's ``lm_head`` inside :func:`response_logits`: the
    model's "logits" are then its final hidden states."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _lm_head_holder(model: nn.Module) -> nn.Module:
    """The module whose ``lm_head`` turns the final hidden states into logits (the
    causal LM inside peft's and Opacus' wrappers, or a top-layer view's)."""
    for module in model.modules():
        if "lm_head" in module._modules:
            return module
    raise ConfigError(f"{type(model).__name__} has no lm_head: not a causal LM")


def response_logits(model: nn.Module, batch: Batch, read: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits predicting each next token where ``read`` ([B, T-1], the loss
    positions) is set, as ``[N, vocab]``, and each row's sequence in the batch.

    A 49k-vocabulary LM head over every position is most of a step's work; here
    it runs on the positions the loss reads alone. The model runs whole (peft's
    prompt and prefix tuning, LoRA, IA3, a top-layer view alike) with its
    ``lm_head`` set aside, so its output is the final hidden states; they are
    gathered at ``read`` and only then put through the head. Exact: the same
    head on the same states (tests/client/test_response_logits.py holds the loss
    and each record's gradient to the whole computation's within 1e-5)."""
    holder = _lm_head_holder(model)
    head = holder._modules["lm_head"]
    assert head is not None
    holder._modules["lm_head"] = _Deferred()
    try:
        states = forward(model, batch).logits
    finally:
        holder._modules["lm_head"] = head
    # prompt tuning's virtual tokens come first: the records' positions are last
    states = states[:, states.shape[1] - batch["input_ids"].shape[1]:]
    rows = read.nonzero()[:, 0]
    return head(states[:, :-1][read]), rows


def to_device(batch: dict[str, torch.Tensor], device: torch.device
        ) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward(model: nn.Module, batch: Batch) -> Any:
    """The model's output for a collated batch: token ids through the whole model,
    or the cached hidden states (``hidden``) through its top layers
    (:class:`fedtune.common.toplayers.TopLayers`)."""
    if "hidden" in batch:
        return model(hidden=batch["hidden"], attention_mask=batch["attention_mask"])
    tuned = _prompt_tuned(model)
    if tuned is not None:
        return _prompted(tuned, batch)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def _prompt_tuned(model: nn.Module) -> Any:
    """The peft model inside ``model`` when it trains prompt tuning, else None."""
    for module in model.modules():
        config = getattr(module, "active_peft_config", None)
        if config is not None:
            return module if config.peft_type == PeftType.PROMPT_TUNING else None
    return None


def _prompted(peft: Any, batch: Batch) -> Any:
    """Prompt tuning's forward with the virtual tokens embedded once per record.

    peft embeds them once for the batch and repeats the result, which is the same
    output but leaves Opacus one gradient for the whole batch (their sum), not one
    per record: DP-SGD would clip the batch's sum as if it were one record's. Here
    each record looks its virtual tokens up itself, so the embedding's per-record
    gradients are exact (tests/client/test_response_logits.py holds them to
    peft's own forward, record by record)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    adapter = peft.active_adapter
    n = peft.active_peft_config.num_virtual_tokens
    tokens = peft.prompt_tokens[adapter].unsqueeze(0).expand(len(ids), -1)
    embeds = peft.word_embeddings(ids)
    prompts = peft.prompt_encoder[adapter](tokens.to(ids.device)).to(embeds.dtype)
    return peft.base_model(
        inputs_embeds=torch.cat((prompts, embeds), dim=1),
        attention_mask=torch.cat((mask.new_ones(len(ids), n), mask), dim=1))


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
