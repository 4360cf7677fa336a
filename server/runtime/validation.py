"""Server-side checks of a site's training reply before it is aggregated.

A reply is rejected (and the round goes on without it) when its adapter tensors do
not match the global adapter's names, shapes and dtypes, hold NaN or Inf, move the
adapter by more than a configured L2 norm, or when its metrics lack a positive
``num-examples`` or differ in keys from the other replies (Flower's FedAvg would
otherwise raise and end the run). Pure functions on arrays; no Flower strategy.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from fedtune.common import records

Arrays = Mapping[str, np.ndarray]


def check_arrays(update: Arrays, current: Arrays, *, max_norm: float = 0.0
                 ) -> str | None:
    """Why ``update`` cannot be averaged into ``current`` (None when it can)."""
    missing = sorted(set(current) - set(update))
    extra = sorted(set(update) - set(current))
    if missing or extra:
        return f"tensor names differ (missing {missing[:3]}, extra {extra[:3]})"
    sq = 0.0
    for name, ref in current.items():
        arr = update[name]
        if arr.shape != ref.shape or arr.dtype != ref.dtype:
            return (f"{name}: {arr.dtype}{list(arr.shape)} where the global adapter "
                    f"has {ref.dtype}{list(ref.shape)}")
        if not np.all(np.isfinite(arr)):
            return f"{name}: NaN or Inf values"
        sq += float(np.sum((arr.astype(np.float64) - ref) ** 2))
    norm = math.sqrt(sq)
    if max_norm > 0 and norm > max_norm:
        return f"update norm {norm:.4g} exceeds federation.max_update_norm {max_norm:g}"
    return None


def check_metrics(metrics: Mapping[str, object], usual_keys: frozenset[str]
                  ) -> str | None:
    """A positive finite ``num-examples`` and the same keys as the other replies."""
    n = metrics.get(records.NUM_EXAMPLES)
    if isinstance(n, bool) or not isinstance(n, int | float) or \
            not math.isfinite(n) or n <= 0:
        return f"metrics lack a positive {records.NUM_EXAMPLES!r} (got {n!r})"
    if frozenset(metrics) != usual_keys:
        return (f"metric keys {sorted(metrics)} differ from the other sites' "
                f"{sorted(usual_keys)}")
    return None


def usual_keys(key_sets: Sequence[frozenset[str]]) -> frozenset[str]:
    """The metric key set most replies share (ties: the first seen)."""
    if not key_sets:
        return frozenset()
    return Counter(key_sets).most_common(1)[0][0]
