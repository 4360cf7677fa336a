"""Distributed noise's mechanism, checked exactly: the grid through Flower's own
quantiser and sum, the sensitivity of the rounded sum, each share's noise, the
accountant's epsilon re-derived, the discrete Gaussian, the clipped-noise slack."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedtune.common.accounting import RDP_ORDERS, epsilon_spent
from fedtune.common.distributed_noise import (
    INFLATION,
    SLACK,
    Grid,
    Mechanism,
    discrete_gaussian,
    levels_for,
    quantization_range,
    tau,
)


def _mech(**kw: object) -> Mechanism:
    args: dict = dict(sigma=5.0, clip=1.0, sites=8, margin=1, dims=8085,
                      grid=Grid(1024.0, levels_for(8)), rounds=60, epsilon=8.0,
                      delta=1e-5)
    return Mechanism(**{**args, **kw})


@pytest.mark.parametrize("sites", [1, 2, 3, 7, 8, 9, 100, 1000])
def test_levels_keep_every_sum_below_the_modulus(sites: int) -> None:
    q = quantization_range(sites)
    assert q & (q - 1) == 0 and sites * q <= 2**30 < 2 * sites * q
    # SecAgg+ sums each site's value (<= Q) and weight (Q) modulo 2**32; Flower's
    # quantiser casts to int32
    assert sites * q < 2**32 and q < 2**31
    assert 2**32 // levels_for(sites) >= max(3, sites)  # Flower's share check


def test_grid_needs_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two.*got 1000; e.g. 1024"):
        Grid(1000.0, 1 << 20)
    assert Grid(0.5, 8).step == 0.125


def test_grid_points_pass_flowers_quantiser_and_sum_exactly() -> None:
    # Prepare: 7 sites' integer vectors over the whole range, extremes included
    grid, m = Grid(1024.0, levels_for(8)), 7
    half = grid.levels // 2
    rng = np.random.default_rng(0)
    ints = [np.concatenate([[-half, half, 0], rng.integers(-half, half + 1, 997)])
            for _ in range(m)]
    # Execute: Flower's quantiser (stochastic rounding), the modular sum with each
    # site's weight 1 (max_weight 1), dequantise and the workflow's offset/ratio
    quantized = [quantize([grid.to_float(j)], grid.bound, grid.levels)[0]
                 for j in ints]
    total = sum(q.astype(np.int64) for q in quantized) % 2**32
    weight = (m * grid.levels) % 2**32
    mean = dequantize([total], grid.bound, grid.levels)[0]
    mean = (mean - (m - 1) * grid.bound) * (grid.levels / weight)
    # Assert: each site's integer exactly, and the sum of the grid points exactly
    for j, q in zip(ints, quantized, strict=True):
        assert np.array_equal(q.astype(np.int64), j + half)
    assert weight == m * grid.levels and int(total.max()) < 2**32
    assert np.allclose(mean * m, sum(ints) * grid.step, rtol=0, atol=1e-9)


def test_one_record_moves_the_rounded_sum_by_at_most_delta2() -> None:
    mech = _mech(dims=50, grid=Grid(1.0, 1 << 10))
    step, rng = mech.grid.step, np.random.default_rng(1)
    worst = 0.0
    for _ in range(2000):
        x = rng.uniform(-0.5, 0.5, 50)
        g = rng.normal(size=50)
        g *= mech.clip / np.linalg.norm(g) * rng.uniform(0.5, 1.0)  # one record
        # fractions at the rounding boundary: the worst case for rounding
        x = (np.floor(x / step) + 0.4999) * step
        a, b = np.rint(x / step), np.rint((x + g) / step)
        worst = max(worst, float(np.linalg.norm(a - b)))
    assert worst <= mech.sensitivity
    assert mech.sensitivity == pytest.approx(mech.clip / step + math.sqrt(50))


def test_shares_carry_the_whole_noise_after_t_drop_out() -> None:
    mech = _mech()
    s = mech.share_sigma
    # each share 1/(n - t) of the variance the sum needs, in grid levels
    assert s * s * (8 - 1) == pytest.approx((INFLATION * 5.0 * mech.sensitivity)**2)
    assert tau(s, 7) == 0.0  # exp(-2 pi^2 s^2 / 2) underflows at s ~ 1e5
    assert mech.effective_sigma() == pytest.approx(5.0 * INFLATION, rel=1e-12)
    assert mech.charged_sigma() == 5.0  # the target, never more
    assert mech.effective_sigma(8) > mech.effective_sigma(7)  # more survivors


def test_a_coarse_grid_is_charged_at_the_noise_it_holds() -> None:
    # 3 sites, t = 1, a grid so coarse that a share is ~0.5 levels: tau > 0
    mech = _mech(sigma=0.7, sites=3, margin=1, dims=1, grid=Grid(8.0, 16),
                 clip=0.01)
    s, t = mech.share_sigma, tau(mech.share_sigma, 2)
    assert s == pytest.approx(0.5, rel=0.01)
    assert t == pytest.approx(10 * math.exp(-2 * math.pi**2 * s * s / 2))
    assert t > 0.5
    eps2 = mech.sensitivity**2 / (2 * s * s) + t * 1 / 2
    assert mech.effective_sigma() == pytest.approx(1 / math.sqrt(eps2))
    assert mech.charged_sigma() == mech.effective_sigma() < 0.65
    with pytest.raises(ValueError, match="below half a level"):
        _mech(sigma=0.5, sites=3, margin=1, dims=1, grid=Grid(8.0, 16),
              clip=0.01).check()


def test_the_ledger_charge_is_the_gaussian_rdp_at_rate_one() -> None:
    # T rounds at (sigma, q=1, 1 step): RDP T * alpha / (2 sigma^2), converted as
    # Opacus does (Balle et al. 2020), re-derived here independently
    sigma, rounds, delta = _mech().charged_sigma(), 60, 1e-5
    got = epsilon_spent([(sigma, 1.0, rounds)], delta=delta)
    orders = np.asarray(RDP_ORDERS, float)
    rdp = rounds * orders / (2 * sigma**2)
    eps = rdp + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    assert got == pytest.approx(float(eps.min()), rel=1e-9)


def test_discrete_gaussian_has_the_exact_mass_function() -> None:
    rng = np.random.default_rng(2)
    sigma = 1.5
    z = discrete_gaussian(sigma, (400_000,), rng)
    ks = np.arange(-12, 13)
    pmf = np.exp(-ks**2 / (2 * sigma**2))
    pmf /= pmf.sum()
    emp = np.array([(z == k).mean() for k in ks])
    assert np.abs(emp - pmf).sum() / 2 < 0.004  # total variation
    big = discrete_gaussian(2e5, (200_000,), rng)
    assert big.dtype == np.int64 and abs(big.std() / 2e5 - 1) < 0.01
    assert abs(big.mean()) < 5 * 2e5 / math.sqrt(200_000)


def test_the_clipped_noise_event_takes_the_stated_share_of_delta() -> None:
    mech = _mech()
    slack = (1 + math.exp(mech.epsilon)) * mech.clip_probability()
    assert slack == pytest.approx(SLACK * mech.delta, rel=1e-9)
    assert 0 < mech.data_bound < mech.grid.bound - mech.noise_bound


def test_a_grid_without_room_for_the_noise_is_refused_with_the_range_needed(
        ) -> None:
    mech = _mech(grid=Grid(8.0, levels_for(8)))
    with pytest.raises(ValueError, match=r"secagg_clipping_range 8 leaves no room.*"
                       r"reaches \+-\d.*at least 64"):
        mech.encode(np.zeros(8085), np.random.default_rng(0))
    with pytest.raises(ValueError, match="max_dropped_or_colluding must be in"):
        _mech(margin=8)


def test_a_share_is_the_boxed_rounded_sum_plus_noise_on_the_grid() -> None:
    mech = _mech(dims=2000)
    x = np.random.default_rng(3).normal(0, 3, 2000)
    x[0] = 5000.0  # beyond the box: clipped (1-Lipschitz: still sensitivity C)
    sent, clipped = mech.encode(x, np.random.default_rng(4))
    assert clipped == 1
    ints = sent / mech.grid.step
    assert np.array_equal(ints, np.rint(ints))  # grid points
    noise = ints - np.rint(np.clip(x, -mech.data_bound, mech.data_bound)
                           / mech.grid.step)
    assert abs(noise.std() / mech.share_sigma - 1) < 0.05
    assert np.abs(sent).max() <= mech.grid.bound
