"""The DP-aware recipe on a site: what a round trains, and the class prior.

- Linear-probe rounds (LP-FT): rounds ``1..train.linear_probe_rounds`` train the
  classification head only; LoRA is frozen, so DP noise covers the head's few
  thousand dimensions instead of the adapter's tens of thousands.
- The class prior: once per run a site releases its class histogram through the
  Gaussian mechanism (``privacy.count_noise_multiplier`` records of noise per bin,
  charged to the privacy state and the ledger like any DP-SGD segment). From it come
  the logit adjustment ``tau * log(prior)`` of the training loss and the record
  weights applied after clipping. The histogram stays on the site, except for the
  decision calibration after the last round: the server then asks for it
  (post-processing of the DP release, no further cost) to sum the federation's
  prior (:mod:`fedtune.client.calibrate`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedtune.common import accounting
from fedtune.common.accounting import Segment
from fedtune.common.config import RunConfig

PRIOR_STATE = "fedtune-class-histogram"  # Context.state key


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


def histogram_segment(cfg: RunConfig) -> Segment:
    """The accountant's view of the histogram release: one Gaussian mechanism."""
    return (cfg.privacy.count_noise_multiplier, 1.0, 1)


def release_histogram(cfg: RunConfig, labels: Sequence[int], *, seed: int
                      ) -> list[float]:
    """The site's class counts, noised under DP (exact when DP is off). The noise
    comes from the OS's entropy unless ``privacy.secure_noise`` is false."""
    dp = cfg.privacy.enabled
    if dp and cfg.privacy.secure_noise:
        seed = secrets.randbits(62)
    return noisy_class_counts(
        labels, num_classes=len(cfg.data.labels),
        sigma=cfg.privacy.count_noise_multiplier if dp else 0.0,
        generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class ClassTerms:
    """What the trainer takes from the prior (``None``: not used)."""

    weights: torch.Tensor | None
    logit_bias: torch.Tensor | None


def class_terms(cfg: RunConfig, counts: Sequence[float] | None) -> ClassTerms:
    """Record weights (<= 1, applied after clipping) and the logit adjustment."""
    if counts is None:
        return ClassTerms(None, None)
    prior = accounting.class_prior(counts)
    weights = None
    if cfg.train.class_weighting != "none":
        weights = torch.tensor(accounting.class_weights(
            prior, mode=cfg.train.class_weighting), dtype=torch.float32)
    bias = None
    if cfg.logit_adjustment > 0:
        bias = cfg.logit_adjustment * torch.log(
            torch.tensor(prior, dtype=torch.float32))
    return ClassTerms(weights, bias)
