"""DP-SGD's mechanics for the trainer: Opacus' per-sample gradients and a
clipping + noising optimizer that may weigh records after clipping.

What a round may spend, and charging it, is :mod:`fedtune.client.privacy`.
"""

from __future__ import annotations

import math
import warnings

import torch
from opacus.grad_sample.utils import wrap_model
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
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
    gsm = wrap_model(model, cfg.grad_sample_mode, batch_first=True,
                     loss_reduction="mean")
    dp_opt = WeightedDPOptimizer(optimizer, noise_multiplier=noise_multiplier,
                         max_grad_norm=cfg.max_grad_norm,
                         expected_batch_size=max(1, expected_batch_size),
                         loss_reduction="mean", generator=generator)
    return gsm, dp_opt
