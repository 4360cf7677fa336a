"""Public priors: a classification head that starts from the label descriptions.

Label names are public: "neoplasms", or an ICD-10 chapter's title. The encoder
embeds them like any record (masked mean pooling, :func:`label_embeddings`), and
each class's head row is set to its label's unit embedding times a scale
(:func:`init_head`), with no bias. Round 0 then labels each record with the label
whose embedding is nearest in angle (the zero-shot classifier), before any record
is read, so at no privacy cost: the central evaluation of round 0 reports it.

The scale is the logit a record gets from the label its features point to
exactly (at the label embeddings' mean norm). It only decides how firmly training
starts from the prior, not round 0's decisions. Measured on the ICD-10 task
(``bench/dp_head_grid.py --grid prior``): a large prior steadies a federation of
small sites, whose DP steps are mostly noise, and holds back sites that learn well
on their own, so ``model.head_init_scale: 0`` takes it from the records of the
federation's typical site, weighted as the average weighs the sites
(:func:`fedtune.common.recipes.prior_scale`, the measured map).

Pure torch (no Flower, no Opacus): the server sets the initial head with it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedtune.common import planning, recipes
from fedtune.common.config import DataConfig, RunConfig
from fedtune.common.model import classifier_head, load_tokenizer

logger = logging.getLogger(__name__)


def label_texts(data: DataConfig) -> list[str]:
    """The words each class starts from: its description, else its name with
    ``-`` and ``_`` read as spaces."""
    if data.label_descriptions:
        return list(data.label_descriptions)
    return [label.replace("-", " ").replace("_", " ") for label in data.labels]


@torch.no_grad()
def label_embeddings(model: nn.Module, tokenizer: Any, texts: Sequence[str], *,
                     device: torch.device, max_length: int = 128) -> torch.Tensor:
    """The head's input for each text: the classifier's pooled encoder output, as
    a record's (``[len(texts), width]``, fp32)."""
    wrapper, _ = classifier_head(model)
    captured: list[torch.Tensor] = []
    hook = wrapper.register_forward_hook(
        lambda _m, args, _out: captured.append(args[0].detach().float().cpu()))
    was_training = model.training
    model.eval()
    try:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        model(input_ids=enc["input_ids"].to(device),
              attention_mask=enc["attention_mask"].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    return captured[0]


def prior_weights(embeddings: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Head rows ``scale * e_k / |e_k|``, divided by the embeddings' mean norm, so
    that a record at that norm pointing exactly at label k gets logit ``scale``."""
    norms = embeddings.norm(dim=1, keepdim=True).clamp(min=1e-12)
    rows: torch.Tensor = scale * embeddings / norms / float(norms.mean())
    return rows


@torch.no_grad()
def init_head(model: nn.Module, tokenizer: Any, texts: Sequence[str], *,
              scale: float, device: torch.device) -> None:
    """Set a linear classification head (in place) to the label prior: its rows
    :func:`prior_weights` of the texts' embeddings, its bias 0."""
    _, head = classifier_head(model)
    if not isinstance(head, nn.Linear):
        raise TypeError("the label prior sets a linear head's rows; this head is "
                        f"{type(head).__name__} (model.head_hidden > 0)")
    if len(texts) != head.out_features:
        raise ValueError(f"{len(texts)} label texts for a head of "
                         f"{head.out_features} classes")
    weights = prior_weights(label_embeddings(model, tokenizer, texts, device=device),
                            scale=scale)
    head.weight.copy_(weights.to(head.weight.device, head.weight.dtype))
    head.bias.zero_()


def start_head(model: nn.Module, cfg: RunConfig, *, site_records: Sequence[int]
               ) -> dict[str, Any]:
    """The run's initial head: with ``model.head_init: labels`` set (in place) to
    the label prior, its scale ``model.head_init_scale`` or, at 0, the measured
    one for the federation's typical site (:func:`fedtune.common.planning.
    typical_site` of ``site_records``, the plan's training records per site; none
    reported: the map's largest size, the lightest prior). Returns what round 0's
    metrics record about it."""
    if not cfg.classifies:
        return {}
    if cfg.model.head_init != "labels":
        return {"head_init": cfg.model.head_init}
    typical = planning.typical_site(site_records, cfg.federation.weighting)
    records = typical if typical is not None else max(recipes.PRIOR_SCALE_MAP)
    scale = cfg.model.head_init_scale or recipes.prior_scale(records)
    init_head(model, load_tokenizer(cfg.model.name_or_path, cfg.model.gguf_file),
              label_texts(cfg.data), scale=scale,
              device=next(model.parameters()).device)
    words = "descriptions" if cfg.data.label_descriptions else "names"
    logger.info("the head starts from the label %s' embeddings (scale %.3g%s): "
                "round 0 is the zero-shot model, no privacy spent", words, scale,
                "" if cfg.model.head_init_scale else
                f", for the typical site's {records:,.0f} records")
    return {"head_init": "labels", "head_init_from": words, "head_init_scale": scale}
