"""Evaluation metrics as pure functions on label/prediction lists."""

from __future__ import annotations

import math
from collections.abc import Sequence


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


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], *,
             num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in truth or
    prediction (scikit-learn's ``f1_score(average='macro')`` on those labels)."""
    scores = []
    for c in range(num_classes):
        tp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if p == c != t)
        fn = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == c != p)
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def perplexity(mean_loss: float) -> float:
    """exp(mean token loss), capped to avoid overflow."""
    return math.exp(min(mean_loss, 50.0))
