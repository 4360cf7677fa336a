"""DP-SGD's mechanics for the trainer: Opacus' per-sample gradients and a
clipping + noising optimizer that may weigh records after clipping.

What a round may spend, and charging it, is :mod:`fedtune.client.privacy`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule, register_grad_sampler
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from peft.tuners.beft.layer import Linear as BeftLinear
from peft.tuners.ia3.layer import Linear as IA3Linear
from torch import nn

from fedtune.common.config import PrivacyConfig
from fedtune.common.errors import PrivacyError

# Opacus' hooks fire on modules whose inputs need no grad (frozen embeddings under
# LoRA); torch warns on every backward. Expected here, so keep the log readable.
warnings.filterwarnings("ignore", message="Full backward hook is firing",
                        category=UserWarning)


class WeightedDPOptimizer(DPOptimizer):  # type: ignore[misc]  # opacus is untyped
    """Opacus' DPOptimizer with a weight <= 1 per record applied *after* clipping.

    Each record's clipped gradient is multiplied by its weight before the sum, so
    no record contributes more than ``max_grad_norm`` and the noise calibration
    (and the accounting) stay exactly those of plain DP-SGD. Weighting the loss
    instead would be undone by the clipping. Set :attr:`sample_weights` (shape
    ``[B]``, values in [0, 1]) before each ``step``; ``None`` means all 1.
    """

    sample_weights: torch.Tensor | None = None

    def clip_and_accumulate(self) -> None:
        weights = self.sample_weights
        if weights is None or len(self.grad_samples[0]) == 0:
            super().clip_and_accumulate()
            return
        if float(weights.max()) > 1.0 + 1e-6 or float(weights.min()) < 0.0:
            raise PrivacyError("record weights must lie in [0, 1] (a weight above 1 "
                               "would break the clipping bound)")
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1)
                             for g in self.grad_samples], dim=1).norm(2, dim=1)
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        factor = factor * weights.to(factor.device, factor.dtype)
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factor.to(grad_sample.device, p.dtype),
                                grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)


# peft layers whose trainable vector sits in a ParameterDict (which Opacus would
# hook, but whose forward never runs): the layer itself is hooked instead, and
# the samplers below give each record's gradient of its vector
VECTOR_LAYERS: tuple[type[nn.Module], ...] = (BeftLinear, IA3Linear)


def _vector(layer: Any, table: nn.ParameterDict) -> nn.Parameter | None:
    """The active adapter's vector, or None where it is frozen."""
    param: nn.Parameter = table[layer.active_adapters[0]]
    return param if param.requires_grad else None


def _per_record(values: torch.Tensor) -> torch.Tensor:
    """Sum every axis but the first (records) and the last (features)."""
    return values.reshape(values.shape[0], -1, values.shape[-1]).sum(1)


@register_grad_sampler(BeftLinear)  # type: ignore[untyped-decorator]  # opacus is untyped
def _beft_grad_sample(layer: Any, _activations: list[torch.Tensor],
                      backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """out = base(x) + b: each record's gradient of b is its output gradient summed
    over its tokens."""
    param = _vector(layer, layer.beft_bias)
    if param is None:
        return {}
    return {param: _per_record(backprops).reshape(-1, *param.shape).to(param.dtype)}


@register_grad_sampler(IA3Linear)  # type: ignore[untyped-decorator]  # opacus is untyped
def _ia3_grad_sample(layer: Any, activations: list[torch.Tensor],
                     backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Feed-forward: out = base(x * l), so dl = x * (g W); else out = base(x) * l,
    so dl = base(x) * g; each summed over the record's tokens."""
    param = _vector(layer, layer.ia3_l)
    if param is None:
        return {}
    x, base = activations[0], layer.get_base_layer()
    with torch.no_grad():
        if layer.is_feedforward:
            grad = _per_record(x * (backprops.to(base.weight.dtype) @ base.weight))
        else:
            grad = _per_record(base(x) * backprops)
    return {param: grad.reshape(-1, *param.shape).to(param.dtype)}


class _GradSampleModule(GradSampleModule):  # type: ignore[misc]  # opacus is untyped
    """Opacus' module wrapper, hooking :data:`VECTOR_LAYERS` as wholes."""

    def iterate_submodules(self, module: nn.Module) -> Iterable[nn.Module]:
        if isinstance(module, VECTOR_LAYERS):
            if any(p.requires_grad for p in module.parameters()):
                yield module
            return
        yield from super().iterate_submodules(module)

    def capture_activations_hook(self, module: nn.Module,
                                 forward_input: list[torch.Tensor],
                                 _forward_output: torch.Tensor) -> None:
        if not isinstance(module, VECTOR_LAYERS):
            super().capture_activations_hook(module, forward_input, _forward_output)
            return
        trainable = [p for p in module.parameters() if p.requires_grad]
        if not (trainable and module.training and torch.is_grad_enabled()
                and self.hooks_enabled):
            return
        held: Any = module  # Opacus keeps each layer's inputs on the layer
        if not hasattr(held, "activations"):
            held.activations = []
        held.activations.append([t.detach() for t in forward_input])
        for p in trainable:
            p._forward_counter += 1  # type: ignore[attr-defined]  # Opacus' counter


def wrap(model: nn.Module, mode: str, *, loss_reduction: str = "mean"
         ) -> nn.Module:
    """Opacus' per-record gradients on ``model`` (``mode``: hooks or functorch,
    ``privacy.grad_sample_mode``); the adapters' vectors included."""
    gsm: nn.Module = _GradSampleModule(model, batch_first=True,
                                       loss_reduction=loss_reduction,
                                       force_functorch=mode == "functorch")
    return gsm


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 cfg: PrivacyConfig, noise_multiplier: float, expected_batch_size: int,
                 generator: torch.Generator | None = None
                 ) -> tuple[nn.Module, WeightedDPOptimizer]:
    """Wrap for per-sample gradients and a clipping+noising optimizer.

    The loss the caller backpropagates must be the *mean* over the batch of
    per-sample losses.
    """
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise PrivacyError(f"invalid noise multiplier {noise_multiplier}")
    gsm = wrap(model, cfg.grad_sample_mode)
    dp_opt = WeightedDPOptimizer(optimizer, noise_multiplier=noise_multiplier,
                         max_grad_norm=cfg.max_grad_norm,
                         expected_batch_size=max(1, expected_batch_size),
                         loss_reduction="mean", generator=generator)
    return gsm, dp_opt
