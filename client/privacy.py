"""Record-level DP-SGD on a site: the run's spending, Opacus wrapping, releases.

The accounting itself is pure and lives in :mod:`fedtune.common.accounting` (the
operator's planner uses it too); its names are re-exported here for the site's code.
:class:`PrivacyState` keeps a site's segments across rounds (in the ClientApp's
``Context.state``) and never leaves the site: only the resulting epsilon is
reported.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from opacus.grad_sample.utils import wrap_model
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from fedtune.common.accounting import (
    NoisePlan,
    Segment,
    calibrate_noise,
    class_prior,
    class_weights,
    epsilon_spent,
    plan_noise,
    plan_schedule,
    run_plan,
    sample_rate,
    steps_per_round,
)
from fedtune.common.config import PrivacyConfig
from fedtune.common.errors import PrivacyError

__all__ = ["NoisePlan", "PrivacyState", "Segment", "WeightedDPOptimizer",
           "calibrate_noise", "class_prior", "class_weights", "epsilon_spent",
           "make_private", "noisy_class_counts", "plan_noise", "plan_schedule",
           "run_plan", "sample_rate", "steps_per_round"]

logger = logging.getLogger(__name__)
# Opacus' hooks fire on modules whose inputs need no grad (frozen embeddings under
# LoRA); torch warns on every backward. Expected here, so keep the log readable.
warnings.filterwarnings("ignore", message="Full backward hook is firing",
                        category=UserWarning)


@dataclass
class PrivacyState:
    """A site's spending in this run, kept in the ClientApp's context state.

    ``noise_multiplier`` is the DP-SGD noise of the rounds that train LoRA;
    rounds up to ``probe_rounds`` (head-only, LP-FT) use ``probe_noise_multiplier``.
    """

    noise_multiplier: float = 0.0
    history: list[Segment] = field(default_factory=list)
    probe_noise_multiplier: float = 0.0
    probe_rounds: int = 0

    def sigma(self, round_: int) -> float:
        """The DP-SGD noise multiplier of round ``round_``."""
        if round_ <= self.probe_rounds and self.probe_noise_multiplier > 0:
            return self.probe_noise_multiplier
        return self.noise_multiplier

    def adopt(self, plan: NoisePlan) -> None:
        self.noise_multiplier = plan.tune_sigma
        self.probe_noise_multiplier, self.probe_rounds = (plan.probe_sigma,
                                                          plan.probe_rounds)

    def charge(self, *, sample_rate_: float, steps: int,
               sigma: float | None = None) -> None:
        if steps > 0:
            self.history.append((self.noise_multiplier if sigma is None else sigma,
                                 sample_rate_, steps))

    def epsilon(self, cfg: PrivacyConfig) -> float:
        return epsilon_spent(self.history, delta=cfg.target_delta,
                             accountant=cfg.accountant)

    def to_config(self) -> dict[str, float | list[float] | list[int]]:
        return {"noise-multiplier": self.noise_multiplier,
                "probe-noise-multiplier": self.probe_noise_multiplier,
                "probe-rounds": self.probe_rounds,
                "sigma": [h[0] for h in self.history],
                "rate": [h[1] for h in self.history],
                "steps": [h[2] for h in self.history]}

    @classmethod
    def from_config(cls, rec: dict[str, object] | None) -> PrivacyState:
        if not rec:
            return cls()
        hist = zip(rec["sigma"], rec["rate"], rec["steps"], strict=True)  # type: ignore
        return cls(noise_multiplier=float(rec["noise-multiplier"]),  # type: ignore
                   history=[(float(s), float(q), int(n)) for s, q, n in hist],
                   probe_noise_multiplier=float(
                       rec.get("probe-noise-multiplier", 0.0)),  # type: ignore
                   probe_rounds=int(rec.get("probe-rounds", 0)))  # type: ignore


def noisy_class_counts(labels: Sequence[int], *, num_classes: int, sigma: float,
                       generator: torch.Generator | None = None) -> list[float]:
    """The site's class histogram with Gaussian noise of ``sigma`` records per bin
    (the Gaussian mechanism: one record changes one bin by 1, L2 sensitivity 1;
    accounted as the segment ``(sigma, 1.0, 1)``). ``sigma = 0``: exact counts
    (DP off)."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for y in labels:
        counts[int(y)] += 1
    if sigma > 0:
        counts += sigma * torch.randn(num_classes, generator=generator,
                                      dtype=torch.float64)
    return [float(c) for c in counts]


class WeightedDPOptimizer(DPOptimizer):
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
