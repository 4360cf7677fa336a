"""Membership-inference metrics, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from fedtune.common.metrics import empirical_epsilon, membership_auc


def test_auc_counts_ties_as_half() -> None:
    # pairs (m, n): 3>1, 3>2, 3=3 (1/2), 4>*, 5>* -> 8.5 / 9
    assert membership_auc([3, 4, 5], [1, 2, 3]) == pytest.approx(8.5 / 9)
    assert membership_auc([1, 1], [1, 1]) == 0.5
    assert membership_auc([0], [1, 2]) == 0.0
    assert math.isnan(membership_auc([], [1]))


def test_empirical_epsilon_from_clopper_pearson_bounds() -> None:
    # Perfect separation of 100 vs 100: FPR = FNR = 0, each bounded above by
    # 1 - 0.025**(1/100) at 95 % (Bonferroni over the two rates).
    upper = 1 - 0.025 ** (1 / 100)
    expected = math.log((1 - upper) / upper)
    assert empirical_epsilon(list(range(100, 200)), list(range(100))) == \
        pytest.approx(expected, rel=1e-6)
    # Indistinguishable scores prove nothing.
    assert empirical_epsilon([1.0] * 50, [1.0] * 50) == 0.0
    # delta only lowers the bound.
    assert empirical_epsilon(list(range(100, 200)), list(range(100)), delta=0.1) < \
        expected

