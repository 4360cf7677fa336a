"""Record-level DP-SGD on a site: noise calibration, accounting, Opacus wrapping.

The accounting is pure: a site's spending is the list of ``(noise_multiplier,
sample_rate, steps)`` segments that Opacus' accountants keep as ``history``, so epsilon
after any number of rounds is recomputed from that list exactly as one long Opacus run
would compute it. :class:`PrivacyState` keeps the list across rounds (in the
ClientApp's ``Context.state``) and never leaves the site: only the resulting epsilon is
reported.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample.utils import wrap_model
from opacus.optimizers import DPOptimizer
from torch import nn

from fedtune.common.config import PrivacyConfig
from fedtune.common.errors import PrivacyError

logger = logging.getLogger(__name__)
# Opacus' hooks fire on modules whose inputs need no grad (frozen embeddings under
# LoRA); torch warns on every backward. Expected here, so keep the log readable.
warnings.filterwarnings("ignore", message="Full backward hook is firing",
                        category=UserWarning)

Segment = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


def _accountant(name: str) -> RDPAccountant | PRVAccountant:
    return RDPAccountant() if name == "rdp" else PRVAccountant()


def epsilon_spent(history: Iterable[Segment], *, delta: float,
                  accountant: str = "rdp") -> float:
    """Epsilon of all segments composed (0.0 for no steps).

    Segments with the same (noise, rate) are merged by adding their steps: RDP is
    linear in the steps, so the result is exactly the same and a long ledger costs
    one accountant term per distinct (noise, rate) instead of one per round.
    """
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        if int(n) > 0:
            key = (float(s), float(q))
            merged[key] = merged.get(key, 0) + int(n)
    segments = [(s, q, n) for (s, q), n in merged.items()]
    if not segments:
        return 0.0
    acc = _accountant(accountant)
    acc.history = segments
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(*, target_epsilon: float, target_delta: float, sample_rate: float,
                    steps: int, accountant: str = "rdp") -> float:
    """Smallest noise multiplier that keeps ``steps`` steps within the target."""
    try:
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta,
            sample_rate=sample_rate, steps=steps, accountant=accountant))
    except ValueError as err:
        raise PrivacyError(f"cannot reach epsilon={target_epsilon} in {steps} steps at "
                           f"sample rate {sample_rate:.4f}: {err}") from err


def sample_rate(*, batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate for an expected batch of ``batch_size``."""
    return min(1.0, batch_size / max(1, num_examples))


def steps_per_round(*, sample_rate_: float, epochs: int, max_steps: int) -> int:
    """Optimizer steps one local round takes (what the trainer will do)."""
    if max_steps > 0:
        return max_steps
    return epochs * max(1, int(1 / sample_rate_))


@dataclass
class PrivacyState:
    """A site's spending in this run, kept in the ClientApp's context state."""

    noise_multiplier: float = 0.0
    history: list[Segment] = field(default_factory=list)

    def charge(self, *, sample_rate_: float, steps: int) -> None:
        if steps > 0:
            self.history.append((self.noise_multiplier, sample_rate_, steps))

    def epsilon(self, cfg: PrivacyConfig) -> float:
        return epsilon_spent(self.history, delta=cfg.target_delta,
                             accountant=cfg.accountant)

    def to_config(self) -> dict[str, float | list[float] | list[int]]:
        return {"noise-multiplier": self.noise_multiplier,
                "sigma": [h[0] for h in self.history],
                "rate": [h[1] for h in self.history],
                "steps": [h[2] for h in self.history]}

    @classmethod
    def from_config(cls, rec: dict[str, object] | None) -> PrivacyState:
        if not rec:
            return cls()
        hist = zip(rec["sigma"], rec["rate"], rec["steps"], strict=True)  # type: ignore
        return cls(noise_multiplier=float(rec["noise-multiplier"]),  # type: ignore
                   history=[(float(s), float(q), int(n)) for s, q, n in hist])


def plan_noise(cfg: PrivacyConfig, *, sample_rate_: float, steps_per_round_: int,
               num_rounds: int) -> float:
    """The configured noise multiplier, or one calibrated so that taking part in
    every planned round spends exactly the target epsilon."""
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    return calibrate_noise(target_epsilon=cfg.target_epsilon,
                           target_delta=cfg.target_delta, sample_rate=sample_rate_,
                           steps=steps_per_round_ * num_rounds,
                           accountant=cfg.accountant)


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 cfg: PrivacyConfig, noise_multiplier: float, expected_batch_size: int,
                 generator: torch.Generator | None = None
                 ) -> tuple[nn.Module, DPOptimizer]:
    """Wrap for per-sample gradients and a clipping+noising optimizer.

    The loss the caller backpropagates must be the *mean* over the batch of
    per-sample losses.
    """
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise PrivacyError(f"invalid noise multiplier {noise_multiplier}")
    gsm = wrap_model(model, cfg.grad_sample_mode, batch_first=True,
                     loss_reduction="mean")
    dp_opt = DPOptimizer(optimizer, noise_multiplier=noise_multiplier,
                         max_grad_norm=cfg.max_grad_norm,
                         expected_batch_size=max(1, expected_batch_size),
                         loss_reduction="mean", generator=generator)
    return gsm, dp_opt
