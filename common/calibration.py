"""Decision calibration: how strongly the final classifier's logit adjustment
applies at decision time, chosen on the sites' validation splits under DP.

Training with the logit adjustment ``tau * log(prior)`` teaches a head whose raw
logits score the classes as if balanced. That is right for rare classes of a
many-class task, and overshoots on a skewed two-class one (the minority is then
predicted too often: high recall, low precision). The decision rule is therefore
``argmax(logits + s * log(prior))`` with a strength ``s`` in :data:`STRENGTHS`:
``s = 0`` keeps the balanced scores (the training's ``tau``), ``s = tau`` scores
as if trained without the adjustment.

Each site counts, on its validation split, per class: its records ``N_c`` and, per
candidate ``s``, the records predicted as ``c`` (``P_c``) and those correctly so
(``TP_c``). One record moves ``N`` in one class and, per candidate, ``P`` and
``TP`` in at most one class each: the L2 sensitivity of the whole vector is
``sqrt(1 + 2 K)`` for ``K`` candidates. The site adds Gaussian noise of
``z * sqrt(1 + 2 K)`` (``z`` = ``privacy.calibration_noise_multiplier``): one
Gaussian mechanism, accounted as the segment ``(z, 1.0, 1)``. The server sums the
noisy counts over the sites and picks the strength with the best macro-F1
estimate (smoothed over neighbouring strengths, :func:`smoothed`), and moves off
the training's own rule (strength 0) only when the gain exceeds what the noise
could explain (:func:`macro_f1_sd`); the test set is never looked at for the
choice.

Pure arithmetic on arrays (no Flower, no model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # fractions of the training's tau


def candidate_biases(prior: Sequence[float], strengths: Sequence[float]
                     ) -> np.ndarray:
    """``[K, C]``: the decision bias ``s * log(prior)`` of each strength."""
    log_prior = np.log(np.clip(np.asarray(prior, np.float64), 1e-12, None))
    return np.asarray(strengths, np.float64)[:, None] * log_prior[None, :]


def sensitivity(candidates: int) -> float:
    """L2 sensitivity of the counts vector: one record, ``N`` once and ``P``,
    ``TP`` once per candidate."""
    return math.sqrt(1 + 2 * candidates)


def counts(logits: np.ndarray, labels: np.ndarray, biases: np.ndarray
           ) -> np.ndarray:
    """``[1 + 2K, C]``: row 0 the records per class, then per candidate ``k`` the
    true positives (row ``1 + 2k``) and the predicted positives (``2 + 2k``)."""
    num_classes = biases.shape[1]
    out = np.zeros((1 + 2 * len(biases), num_classes), np.float64)
    labels = np.asarray(labels, np.int64)
    out[0] = np.bincount(labels, minlength=num_classes)[:num_classes]
    for k, bias in enumerate(biases):
        pred = np.argmax(np.asarray(logits, np.float64) + bias[None, :], axis=1)
        out[1 + 2 * k] = np.bincount(pred[pred == labels],
                                     minlength=num_classes)[:num_classes]
        out[2 + 2 * k] = np.bincount(pred, minlength=num_classes)[:num_classes]
    return out


def noisy(exact: np.ndarray, *, z: float, rng: np.random.Generator) -> np.ndarray:
    """The counts with the Gaussian mechanism's noise (``z = 0``: exact)."""
    if z <= 0:
        return exact.copy()
    candidates = (exact.shape[0] - 1) // 2
    return exact + rng.normal(0.0, z * sensitivity(candidates), exact.shape)


@dataclass(frozen=True)
class Estimate:
    """One candidate's figures from the summed (noisy) counts."""

    strength: float
    macro_f1: float
    precision: list[float]
    recall: list[float]
    f1: list[float]


def estimates(total: np.ndarray, strengths: Sequence[float]) -> list[Estimate]:
    """Per-class precision, recall and F1 and the macro-F1 of each candidate,
    from the federation's summed counts (negative noisy counts clipped to 0).
    Classes the validation splits hold (nearly) no records of are left out of the
    macro average."""
    n = np.clip(total[0], 0.0, None)
    present = n >= 1.0
    out = []
    for k, s in enumerate(strengths):
        tp = np.clip(total[1 + 2 * k], 0.0, None)
        pos = np.clip(total[2 + 2 * k], 0.0, None)
        tp = np.minimum(tp, np.minimum(pos, n))
        precision = np.where(pos > 0, tp / np.maximum(pos, 1e-12), 0.0)
        recall = np.where(n > 0, tp / np.maximum(n, 1e-12), 0.0)
        f1 = np.where(pos + n > 0, 2 * tp / np.maximum(pos + n, 1e-12), 0.0)
        macro = float(f1[present].mean()) if present.any() else 0.0
        out.append(Estimate(float(s), macro, precision.tolist(), recall.tolist(),
                            f1.tolist()))
    return out


def smoothed(found: Sequence[Estimate]) -> list[float]:
    """Each candidate's macro-F1 estimate averaged with its neighbours' (weights
    1/4, 1/2, 1/4; the ends reflected). The true macro-F1 moves smoothly with the
    strength while each candidate's noise is its own, so this cuts the noise by
    about 0.6 for a small bias; with 8-10 sites of ~150 validation records each, a
    single candidate's estimate swings by several points."""
    f = [e.macro_f1 for e in found]
    if len(f) < 3:
        return f
    return [(f[max(i - 1, 0) if i else 1] + 2 * f[i]
             + f[i + 1 if i + 1 < len(f) else len(f) - 2]) / 4
            for i in range(len(f))]


def macro_f1_sd(total: np.ndarray, strength_index: int, *, noise_sd: float
                ) -> float:
    """The standard deviation the counts' noise (``noise_sd`` per summed count)
    puts on one candidate's macro-F1 estimate (the delta method on
    ``F1_c = 2 TP / (P + N)``, averaged over the classes present)."""
    n = np.clip(total[0], 0.0, None)
    present = n >= 1.0
    if not present.any() or noise_sd <= 0:
        return 0.0
    tp = np.clip(total[1 + 2 * strength_index], 0.0, None)
    pos = np.clip(total[2 + 2 * strength_index], 0.0, None)
    denom = np.maximum(pos + n, 1.0)
    var = noise_sd ** 2 * ((2 / denom) ** 2 + 2 * (2 * tp / denom ** 2) ** 2)
    # an F1 estimate lies in [0, 1]: its sd is at most 0.5 however few the records
    # (the delta method alone explodes on a class of a handful of noisy counts)
    var = np.minimum(var, 0.25)
    return float(math.sqrt(var[present].sum()) / present.sum())


def choose(found: Sequence[Estimate], *, margin: float = 0.0) -> Estimate:
    """The candidate with the best smoothed macro-F1 estimate; the first one (the
    training's own decision rule, strength 0) unless the best beats it by more
    than ``margin`` (the noise's standard error: a move the noise could explain
    is not made)."""
    scores = smoothed(found)
    best = max(range(len(found)), key=lambda i: scores[i])
    return found[best] if scores[best] - scores[0] > margin else found[0]
