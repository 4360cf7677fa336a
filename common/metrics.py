"""Evaluation metrics as pure functions on label/prediction lists."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of exact matches (0.0 for empty input)."""
    if not y_true:
        return 0.0
    return sum(int(t == p) for t, p in zip(y_true, y_pred, strict=True)) / len(y_true)


def per_class_recall(y_true: Sequence[int], y_pred: Sequence[int], *,
                     num_classes: int) -> list[float]:
    """Recall of each class; a class absent from ``y_true`` gets NaN."""
    out = []
    for c in range(num_classes):
        support = sum(1 for t in y_true if t == c)
        hits = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == p == c)
        out.append(hits / support if support else math.nan)
    return out


def _counts(y_true: Sequence[int], y_pred: Sequence[int], c: int
            ) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of class ``c``."""
    pairs = list(zip(y_true, y_pred, strict=True))
    return (sum(1 for t, p in pairs if t == p == c),
            sum(1 for t, p in pairs if p == c != t),
            sum(1 for t, p in pairs if t == c != p))


def per_class_precision(y_true: Sequence[int], y_pred: Sequence[int], *,
                        num_classes: int) -> list[float]:
    """Precision of each class; NaN for a class never predicted nor present, 0.0
    for a present class that is never predicted."""
    out = []
    for c in range(num_classes):
        tp, fp, fn = _counts(y_true, y_pred, c)
        out.append(tp / (tp + fp) if tp + fp else (0.0 if fn else math.nan))
    return out


def per_class_f1(y_true: Sequence[int], y_pred: Sequence[int], *,
                 num_classes: int) -> list[float]:
    """F1 of each class; NaN for a class absent from truth and prediction."""
    out = []
    for c in range(num_classes):
        tp, fp, fn = _counts(y_true, y_pred, c)
        out.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan)
    return out


COLLAPSE_SHARE = 0.95  # one class taking this share of the predictions = collapse


def prediction_spread(y_true: Sequence[int], y_pred: Sequence[int], *,
                      num_classes: int) -> dict[str, float]:
    """How the predictions spread over the classes (a DP collapse shows here).

    ``top_prediction`` (class id) and ``top_prediction_share``: the most
    predicted class and its share; ``classes_never_predicted``: classes present
    in ``y_true`` that the model never predicts; ``collapsed``: 1.0 when one
    class takes at least :data:`COLLAPSE_SHARE` of the predictions although
    the truth holds more than one class, and the others get less than a quarter
    of their true share.
    """
    if not y_pred:
        return {}
    counts = [sum(1 for p in y_pred if p == c) for c in range(num_classes)]
    top = max(range(num_classes), key=lambda c: counts[c])
    share = counts[top] / len(y_pred)
    present = {t for t in y_true}
    never = sum(1 for c in present if counts[c] == 0)
    # the other classes' true share, of which a collapsed model predicts under a
    # quarter (on a 90 % majority, 96 % "other" is a weak model, not a collapse)
    rest = 1.0 - sum(1 for t in y_true if t == top) / max(len(y_true), 1)
    return {"top_prediction": float(top), "top_prediction_share": share,
            "classes_never_predicted": float(never),
            "collapsed": float(share >= COLLAPSE_SHARE and len(present) > 1
                               and 1.0 - share < 0.25 * rest)}


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], *,
             num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in truth or
    prediction (scikit-learn's ``f1_score(average='macro')`` on those labels)."""
    scores = [f for f in per_class_f1(y_true, y_pred, num_classes=num_classes)
              if not math.isnan(f)]
    return sum(scores) / len(scores) if scores else 0.0


def perplexity(mean_loss: float) -> float:
    """exp(mean token loss), capped to avoid overflow."""
    return math.exp(min(mean_loss, 50.0))


# --- membership inference (pure) ------------------------------------------------

def membership_auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """ROC AUC of "higher score = member" (Mann-Whitney U; ties count one half)."""
    if not members or not nonmembers:
        return math.nan
    ranked = sorted([(s, 1) for s in members] + [(s, 0) for s in nonmembers])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mid = (i + j + 1) / 2  # average 1-based rank of the tie block
        rank_sum += mid * sum(flag for _, flag in ranked[i:j])
        i = j
    n1, n0 = len(members), len(nonmembers)
    return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0)


def _upper(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound of a rate with ``k`` of ``n``."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(1 - alpha, k + 1, n - k))


def empirical_epsilon(members: Sequence[float], nonmembers: Sequence[float], *,
                      delta: float = 0.0, confidence: float = 0.95) -> float:
    """Lower bound on epsilon that a threshold attack proves (Jagielski et al. 2020).

    For every threshold, the false-positive and false-negative rates get one-sided
    Clopper-Pearson upper bounds (Bonferroni over the two); a (eps, delta)-DP
    mechanism must satisfy FPR + e^eps FNR >= 1 - delta and the symmetric one.
    Returns the largest eps any threshold forces (0.0 when none does).
    """
    if not members or not nonmembers:
        return 0.0
    alpha = (1 - confidence) / 2
    best = 0.0
    for t in sorted(set(members) | set(nonmembers)):
        fp = sum(s >= t for s in nonmembers)
        fn = sum(s < t for s in members)
        fpr = _upper(fp, len(nonmembers), alpha)
        fnr = _upper(fn, len(members), alpha)
        for num, den in ((1 - delta - fpr, fnr), (1 - delta - fnr, fpr)):
            if num > 0 and den > 0:
                best = max(best, math.log(num / den))
    return best


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], *,
                     num_classes: int) -> list[list[int]]:
    """``m[t][p]``: how many records of true class ``t`` were predicted ``p``."""
    out = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(y_true, y_pred, strict=True):
        out[t][p] += 1
    return out


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], *,
                          labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro-F1, the prediction spread and per-class precision / recall /
    F1 (``precision-NAME`` ...; a class with no support or no prediction is left
    out rather than reported as NaN)."""
    k = len(labels)
    out = {"accuracy": accuracy(y_true, y_pred),
           "macro-f1": macro_f1(y_true, y_pred, num_classes=k),
           **prediction_spread(y_true, y_pred, num_classes=k)}
    for key, values in (("precision", per_class_precision(y_true, y_pred,
                                                          num_classes=k)),
                        ("recall", per_class_recall(y_true, y_pred, num_classes=k)),
                        ("f1", per_class_f1(y_true, y_pred, num_classes=k))):
        out.update({f"{key}-{n}": v for n, v in zip(labels, values, strict=True)
                    if not math.isnan(v)})
    return out


def paired_bootstrap_macro_f1(y_true: Sequence[int], pred_a: Sequence[int],
                              pred_b: Sequence[int], *, num_classes: int,
                              resamples: int = 2000, level: float = 0.95,
                              seed: int = 0) -> tuple[float, float, float]:
    """Macro-F1(A) - macro-F1(B) on one test set, with a paired bootstrap
    percentile interval: each resample draws the records with replacement and
    scores both runs' predictions on the same draw, so what the records share
    (their difficulty) cancels. Returns (difference, low, high)."""
    n = len(y_true)
    if not n or len(pred_a) != n or len(pred_b) != n:
        raise ValueError(f"paired bootstrap: {n} labels but {len(pred_a)} and "
                         f"{len(pred_b)} predictions")
    truth = np.eye(num_classes)[np.asarray(y_true)]  # [n, K] one-hot
    rng = np.random.default_rng(seed)
    # how often each record is drawn in each resample: [resamples, n]
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)

    def scores(pred: Sequence[int]) -> Any:
        guess = np.eye(num_classes)[np.asarray(pred)]
        tp, p, t = weights @ (truth * guess), weights @ guess, weights @ truth
        denom = p + t  # 2TP + FP + FN
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)
        return np.nanmean(f1, axis=1)  # classes present in truth or prediction

    diffs = scores(pred_a) - scores(pred_b)
    tail = (1 - level) / 2
    point = (macro_f1(y_true, pred_a, num_classes=num_classes)
             - macro_f1(y_true, pred_b, num_classes=num_classes))
    return (point, float(np.quantile(diffs, tail)),
            float(np.quantile(diffs, 1 - tail)))
