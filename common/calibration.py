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

A two-class task releases less: a record's decision under candidate ``k`` is
``d > t_k`` for its score ``d = logit_1 - logit_0`` and the candidate's threshold
``t_k``, so the number ``j`` of candidates that predict class 1 for it tells its
decision under every candidate. Each site releases the histogram ``H[c, j]`` of its
validation records by true class ``c`` and ``j`` (:func:`histogram`): one record
moves one cell by one, an L2 sensitivity of 1 instead of ``sqrt(1 + 2 K)`` (3.3 at
5 candidates), under the same Gaussian mechanism and the same accounting. The
server derives every candidate's counts from the summed histogram
(:func:`from_histogram`) and keeps the candidate where the minority class is
predicted as often as it occurs (:func:`balance_point`: its precision equals its
recall), rather than the best macro-F1 estimate: macro-F1 moves by a point or less
across the strengths that matter, far below what the noise on ~100 minority
validation records can resolve, while the minority's count of false positives
minus false negatives moves by tens of records per step. Its noise is half the
counts' (``RunConfig.calibration_sigma``).

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


def sensitivity(candidates: int, num_classes: int = 0) -> float:
    """L2 sensitivity of the released vector: for two classes the histogram's
    (one record, one cell); else the counts' (one record, ``N`` once and ``P``,
    ``TP`` once per candidate)."""
    return 1.0 if num_classes == 2 else math.sqrt(1 + 2 * candidates)


def release_shape(candidates: int, num_classes: int) -> tuple[int, int]:
    """The shape of what a site releases: the histogram's ``[2, K + 1]`` for two
    classes, else the counts' ``[1 + 2K, C]``."""
    if num_classes == 2:
        return (2, candidates + 1)
    return (1 + 2 * candidates, num_classes)


def release_name(num_classes: int) -> str:
    """What a site releases, in a word (the logs, the calibration record)."""
    return "histogram" if num_classes == 2 else "counts"


def released(logits: np.ndarray, labels: np.ndarray, biases: np.ndarray
             ) -> np.ndarray:
    """What a site releases (before noise): :func:`histogram` for two classes,
    else :func:`counts`."""
    if biases.shape[1] == 2:
        return histogram(logits, labels, biases)
    return counts(logits, labels, biases)


def to_counts(total: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """The summed release in :func:`counts`' layout."""
    return from_histogram(total, biases) if biases.shape[1] == 2 else total


def _at_least(biases: np.ndarray) -> np.ndarray:
    """``L_k``: candidate ``k`` predicts class 1 for a record exactly when at least
    ``L_k`` candidates do (the thresholds ``t_m <= t_k``)."""
    t = biases[:, 0] - biases[:, 1]
    least: np.ndarray = (t[None, :] <= t[:, None]).sum(axis=1)
    return least


def histogram(logits: np.ndarray, labels: np.ndarray, biases: np.ndarray
              ) -> np.ndarray:
    """``[2, K + 1]``: records by true class and by how many of the ``K``
    candidates predict class 1 for them (two classes only)."""
    d = np.asarray(logits, np.float64)
    score = (d[:, 1] - d[:, 0]) if len(d) else np.zeros(0)
    t = biases[:, 0] - biases[:, 1]
    j = (score[:, None] > t[None, :]).sum(axis=1)
    out = np.zeros((2, len(biases) + 1), np.float64)
    np.add.at(out, (np.asarray(labels, np.int64), j), 1.0)
    return out


def from_histogram(hist: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """The :func:`counts` layout ``[1 + 2K, 2]`` from a (summed, noisy)
    :func:`histogram`: exact where the histogram is."""
    k = len(biases)
    out = np.zeros((1 + 2 * k, 2), np.float64)
    out[0] = hist.sum(axis=1)
    for i, least in enumerate(_at_least(biases)):
        ones, zeros = hist[:, least:], hist[:, :least]
        out[1 + 2 * i] = [zeros[0].sum(), ones[1].sum()]
        out[2 + 2 * i] = [zeros.sum(), ones.sum()]
    return out


def excess(total: np.ndarray, cls: int) -> np.ndarray:
    """Per candidate, from the summed counts: the records predicted as class
    ``cls`` minus those in it (false positives minus false negatives; 0 where its
    precision equals its recall)."""
    k = (len(total) - 1) // 2
    return np.asarray([total[2 + 2 * i, cls] - total[0, cls] for i in range(k)],
                      np.float64)


def balance_point(total: np.ndarray, cls: int) -> int:
    """The candidate nearest where class ``cls`` is predicted as often as it
    occurs: the zero of a line fitted to :func:`excess` over the candidates (their
    noise is shared, cell by cell, so the line's zero moves less than any one
    candidate's excess), clipped to the candidates; where the fitted line does not
    fall (noise or a flat model), the candidate of the smallest excess."""
    found = excess(total, cls)
    if len(found) < 2:
        return 0
    slope, at_zero = np.polyfit(np.arange(len(found), dtype=np.float64), found, 1)
    if slope >= 0:
        return int(np.argmin(np.abs(found)))
    return int(np.clip(np.rint(-at_zero / slope), 0, len(found) - 1))


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


def noisy(exact: np.ndarray, *, z: float, rng: np.random.Generator,
          candidates: int, num_classes: int) -> np.ndarray:
    """The release with the Gaussian mechanism's noise, ``z`` times its
    :func:`sensitivity` (``z = 0``: exact)."""
    if z <= 0:
        return exact.copy()
    return exact + rng.normal(0.0, z * sensitivity(candidates, num_classes),
                              exact.shape)


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
    than ``margin`` (what the noise could explain: a move it could explain is not
    made)."""
    scores = smoothed(found)
    best = max(range(len(found)), key=lambda i: scores[i])
    return found[best] if scores[best] - scores[0] > margin else found[0]
