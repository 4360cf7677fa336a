"""LoRA on the top k transformer layers, trained on cached hidden states.

With ``lora.top_layers: k`` only the top k layers carry LoRA: every layer below,
and the embeddings, are frozen and hold no adapter, so the hidden state entering
layer ``L - k`` depends on the record alone. It is computed once per record and
cached for the run (:func:`fedtune.common.features.hidden_inputs`); a training step
then runs the top k layers (+ pooling and head) only, forward and backward.

This is exact: :class:`TopLayers` shares the model's own top layers and runs them
through the model's own forward (its mask and position handling), so each record's
loss, its gradient and therefore its clipping and DP noise are those of the whole
model (tests/common/test_toplayers.py holds it to 1e-5). What the cache leaves out
is the frozen layers' dropout: they are computed in eval mode, once.

Supported: the BERT family (their embeddings are replaced by a pass-through, so
the cached states enter the first kept layer) and Llama-style decoders (which feed
``inputs_embeds`` to their layers unchanged). Pure torch + peft, no Flower.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from fedtune.common.errors import ModelError
from fedtune.common.model import _unwrap, check_top_layers, num_layers
from fedtune.common.standalone import masked_mean

LAYER_INDEX = re.compile(r"\.(?:layer|layers|h)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The transformer layer a parameter name belongs to (None: outside them)."""
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _layer_path(module: nn.Module, count: int) -> list[str]:
    """Attribute path from ``module`` to its ModuleList of ``count`` layers."""
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) == count and name:
            path: list[str] = name.split(".")
            return path
    raise ModelError(f"no list of {count} transformer layers in "
                     f"{type(module).__name__}")


class _PassThrough(nn.Module):
    """Stands in for an encoder's embeddings: the cached states go on unchanged."""

    def forward(self, *_args: Any, inputs_embeds: torch.Tensor | None = None,
                **_kwargs: Any) -> torch.Tensor:
        assert inputs_embeds is not None  # only ever called with cached states
        return inputs_embeds


def _view(module: nn.Module, path: list[str], keep: slice,
          bypass_embeddings: bool) -> nn.Module:
    """A shallow copy of ``module`` whose layer list keeps ``keep``; every layer,
    weight and adapter is shared with the original (training one trains both)."""
    top = copy.copy(module)
    top._modules = dict(module._modules)
    if bypass_embeddings and "embeddings" in top._modules:
        top._modules["embeddings"] = _PassThrough()
    if len(path) == 1:
        layers = module._modules[path[0]]
        assert isinstance(layers, nn.ModuleList)
        top._modules[path[0]] = nn.ModuleList(list(layers)[keep])
        return top
    child = module._modules[path[0]]
    assert child is not None
    top._modules[path[0]] = _view(child, path[1:], keep, bypass_embeddings)
    return top


def _base(model: nn.Module) -> tuple[Any, Any, bool]:
    """(the model inside peft and Opacus' wrappers, the transformer whose layer list
    is cut: a classifier's encoder or the causal LM itself, whether it classifies)."""
    peft: Any = _unwrap(model)
    inner: Any = peft.base_model.model
    classifier = hasattr(inner, "encoder") and hasattr(inner, "head")
    return inner, inner.encoder if classifier else inner, classifier


class TopLayers(nn.Module):
    """The top ``k`` layers of a classifier (then its pooling and head) or of a
    causal LM (then its norm and LM head), fed the cached hidden states entering
    layer ``L - k``; :func:`fedtune.common.loops.class_logits` and
    ``per_sample_loss`` call it with the batch's ``hidden`` and ``attention_mask``.
    """

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        inner, base, self.classifier = _base(model)
        count = num_layers(base.config)
        check_top_layers(base.config, k)
        self.k = k
        self.first = count - k
        self.body = _view(base, _layer_path(base, count), slice(count - k, count),
                          bypass_embeddings=self.classifier)
        self.head = inner.head if self.classifier else None

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        if not self.classifier:  # a causal LM: its output (logits)
            return self.body(inputs_embeds=hidden, attention_mask=attention_mask,
                             use_cache=False)
        pooled = masked_mean(self.body(inputs_embeds=hidden,
                                       attention_mask=attention_mask
                                       ).last_hidden_state, attention_mask)
        assert self.head is not None
        logits: torch.Tensor = self.head(
            pooled.to(next(self.head.parameters()).dtype))
        return logits


def layer_input_hook(model: nn.Module, layer: int) -> tuple[Any, list[torch.Tensor]]:
    """Register a hook that captures the hidden state entering ``layer`` (of the
    model's layer list) and stops the forward pass there (:class:`Captured`);
    returns (the hook handle, the list it appends to)."""
    _, base, _ = _base(model)
    count = num_layers(base.config)
    layers: Any = base.get_submodule(".".join(_layer_path(base, count)))
    captured: list[torch.Tensor] = []

    def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state = args[0] if args else kwargs["hidden_states"]
        captured.append(state.detach())
        raise Captured

    return layers[layer].register_forward_pre_hook(grab, with_kwargs=True), captured


class Captured(Exception):  # noqa: N818  # a control-flow signal, not an error
    """Raised by :func:`layer_input_hook` once it holds the layer's input."""
