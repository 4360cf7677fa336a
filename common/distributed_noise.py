"""Distributed DP noise under SecAgg+ (``privacy.noise: distributed``): each site
adds a share of the noise, and only the sum the server unmasks carries all of it.

The mechanism, per round (DP-FedSGD: one full-batch DP step per round):

1. site i sums its records' gradients, each clipped to L2 norm ``C`` (and weighed
   by at most 1 after clipping): ``x_i``; one record moves the sum of the sites'
   ``x_i`` by at most ``C``;
2. it clips ``x_i`` per coordinate to ``+-(B - M)`` (a box: 1-Lipschitz, so the
   sensitivity stays ``C``), scales by ``1/step`` and rounds to the nearest
   integer: one record now moves the integer vector by at most
   ``Delta2 = C/step + sqrt(d)`` in L2 (each coordinate's rounding moves it by
   < 1 more), over the ``d`` trained coordinates;
3. it adds discrete Gaussian noise ``N_Z(0, s^2)`` to each coordinate (Canonne,
   Kamath, Steinke 2020; exact integers) with ``s^2 = sigma^2 Delta2^2 / (n - t)``
   (``n`` sites a round, ``t`` of them may drop out or collude with the server),
   and sends ``step * (integer vector)``: a point of SecAgg+'s quantisation grid,
   which Flower's quantiser maps to the same integer exactly (:class:`Grid`);
4. SecAgg+ sums the integers modulo ``2**32``; with ``Q`` levels per site and
   ``n * Q <= 2**30`` the sum never wraps. The server unmasks only with at least
   ``federation.secagg_threshold >= n - t`` sites' key shares, so an unmasked sum
   holds at least ``n - t`` noise shares; a round with fewer survivors is never
   unmasked (Flower's SecAgg+ cannot rebuild the masks) and the sites' charges
   stand as released, never more.

The sum of ``m >= n - t`` discrete Gaussians of variance ``s^2`` is not exactly a
discrete Gaussian; Kairouz, Liu and Steinke 2021 (Theorem 12: the distributed
discrete Gaussian) bound it: the release is ``eps_K^2/2``-concentrated DP, i.e.
RDP ``alpha * eps_K^2 / 2`` at every order, with
``eps_K^2 = Delta2^2 / (m s^2) + tau d / 2`` and
``tau = 10 sum_{k=1}^{m-1} exp(-2 pi^2 s^2 k / (k + 1))``. That is the Gaussian
mechanism's RDP at noise multiplier ``1/eps_K`` (:func:`Mechanism.
effective_sigma`), which each site's ledger charges as one DP-SGD step at sample
rate 1: ``(sigma, 1, 1)``. At the grids used here ``s`` is 10^4-10^6 levels and
``tau`` is below 1e-300.

What the grid cannot hold: a noised coordinate beyond ``+-B`` would be clipped by
the quantiser. The data part lies within ``B - M``; the noise passes ``M`` with
probability at most ``2 exp(-M^2 / (2 s^2))`` per coordinate (the discrete
Gaussian is sub-Gaussian). ``M`` is sized so that over every coordinate, site and
round of the run that probability ``delta_c`` satisfies
``(1 + e^eps) delta_c <= SLACK * delta``: the release is
``(eps, delta + SLACK * delta)``-DP where the accountant says ``(eps, delta)``.

Pure math and numpy: the site's torch side is :mod:`fedtune.client.pooled`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SLACK = 1e-3  # the share of delta the clipped-noise event may take
INFLATION = 1.0 + 1e-9  # the shares' noise a hair above the target (float safety)


def quantization_range(sites: int) -> int:
    """Levels per site ``Q``: the largest power of two with ``sites * Q <= 2**30``
    (the sum of every site's value and weight then never wraps ``2**32``, and
    each value fits Flower's int32 quantiser)."""
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    return 1 << (30 - math.ceil(math.log2(sites)))


def levels_for(sites: int) -> int:
    """The grid's levels for a run whose rounds train ``sites`` sites (SecAgg+
    shares among at least 3)."""
    return quantization_range(max(3, sites))


def is_power_of_two(value: float) -> bool:
    """``value`` is 2**k for an integer k (negative k included)."""
    if not value > 0 or not math.isfinite(value):
        return False
    mantissa, _ = math.frexp(value)
    return mantissa == 0.5


def power_of_two_problem(bound: float) -> str | None:
    """Why ``federation.secagg_clipping_range`` cannot carry distributed noise
    (None: it can): it must be a power of two."""
    if is_power_of_two(bound):
        return None
    near = 2.0 ** round(math.log2(bound)) if bound > 0 else 1.0
    return (f"federation.secagg_clipping_range: distributed noise needs a power of "
            f"two (exact integers through SecAgg+'s quantisation), got {bound:g}; "
            f"e.g. {near:g}")


@dataclass(frozen=True)
class Grid:
    """SecAgg+'s quantisation grid: ``levels`` integers over ``+-bound``
    (``federation.secagg_clipping_range``); ``step = 2 bound / levels``. With
    ``bound`` and ``levels`` powers of two, every ``step * j`` (``|j| <= levels /
    2``) is exact in float64 and Flower's quantiser returns ``j + levels/2``
    exactly, with no stochastic rounding."""

    bound: float
    levels: int

    def __post_init__(self) -> None:
        problem = power_of_two_problem(self.bound)
        if problem:
            raise ValueError(problem)
        if self.levels < 2 or self.levels & (self.levels - 1):
            raise ValueError(f"levels must be a power of two >= 2, got {self.levels}")

    @property
    def step(self) -> float:
        return 2.0 * self.bound / self.levels

    def to_float(self, ints: np.ndarray) -> np.ndarray:
        """Integers (within ``+-levels/2``) -> the exact grid points, float64."""
        if np.abs(ints).max(initial=0) > self.levels // 2:
            raise ValueError("a value lies outside the grid")
        return ints.astype(np.float64) * self.step


def tau(share_sigma: float, shares: int) -> float:
    """Kairouz-Liu-Steinke's tau for the sum of ``shares`` discrete Gaussians of
    std ``share_sigma`` (0 for one share)."""
    s2 = share_sigma * share_sigma
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * s2 * k / (k + 1))
                      for k in range(1, shares))


@dataclass(frozen=True)
class Mechanism:
    """One round's distributed discrete Gaussian at one site.

    ``sigma``: the noise multiplier the sum must carry (per unit of ``clip``, the
    per-record clipping norm); ``sites``: ``n``, the sites a round trains;
    ``margin``: ``t``, sites that may drop out or collude; ``dims``: ``d``, the
    coordinates trained this round; ``rounds``: the run's rounds (for the
    clipped-noise slack); ``epsilon``/``delta``: the run's target.
    """

    sigma: float
    clip: float
    sites: int
    margin: int
    dims: int
    grid: Grid
    rounds: int
    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not 0 <= self.margin < self.sites:
            raise ValueError(f"privacy.max_dropped_or_colluding must be in [0, "
                             f"{self.sites - 1}] (fewer than the {self.sites} sites "
                             f"a round trains), got {self.margin}")
        if self.sigma <= 0 or self.clip <= 0 or self.dims < 1:
            raise ValueError("distributed noise needs sigma > 0, clip > 0, dims >= 1")

    @property
    def honest(self) -> int:
        """Shares the unmasked sum holds at least: ``n - t``."""
        return self.sites - self.margin

    @property
    def sensitivity(self) -> float:
        """``Delta2``: one record's L2 reach on the site's integer vector."""
        return self.clip / self.grid.step + math.sqrt(self.dims)

    @property
    def share_sigma(self) -> float:
        """``s``, each site's discrete Gaussian std in grid levels."""
        return INFLATION * self.sigma * self.sensitivity / math.sqrt(self.honest)

    def effective_sigma(self, shares: int | None = None) -> float:
        """The Gaussian noise multiplier whose RDP bounds the unmasked sum of
        ``shares`` (default ``n - t``) sites' noise: ``1 / eps_K``."""
        m = self.honest if shares is None else shares
        s = self.share_sigma
        eps2 = self.sensitivity**2 / (m * s * s) + tau(s, m) * self.dims / 2.0
        return 1.0 / math.sqrt(eps2)

    def charged_sigma(self) -> float:
        """What the ledger books: the target, or less if the sum holds less."""
        return min(self.sigma, self.effective_sigma())

    @property
    def noise_bound(self) -> float:
        """``M``: how far (in the grid's float units) a share's noise may reach
        before the clipped-noise event, sized to ``SLACK * delta``."""
        events = 2.0 * self.rounds * self.sites * self.dims
        k = math.sqrt(2.0 * math.log(events * (1.0 + math.exp(self.epsilon))
                                     / (SLACK * self.delta)))
        return k * self.share_sigma * self.grid.step

    def clip_probability(self) -> float:
        """``delta_c``: the chance, over the whole run, that any share's noise
        passes ``noise_bound`` (sub-Gaussian tail, union bound)."""
        k = self.noise_bound / (self.share_sigma * self.grid.step)
        return 2.0 * self.rounds * self.sites * self.dims * math.exp(-k * k / 2.0)

    @property
    def data_bound(self) -> float:
        """``B - M`` (less one step, the rounding's reach): the box each site's
        clipped-gradient sum is clipped to."""
        return self.grid.bound - self.noise_bound - self.grid.step

    def check(self) -> None:
        """Refuse a grid whose range leaves no room for the noise, or whose
        levels are too coarse for the discrete Gaussian's bound (a share below
        half a level)."""
        if self.share_sigma < 0.5:
            raise ValueError(f"distributed noise: a share's noise is "
                             f"{self.share_sigma:.3g} levels, below half a "
                             f"level (the bound it is accounted with needs >= "
                             f"0.5); lower federation."
                             f"secagg_clipping_range or raise the noise")
        if self.data_bound <= 0:
            need = 2.0 ** math.ceil(math.log2(2.0 * self.noise_bound))
            raise ValueError(
                f"federation.secagg_clipping_range {self.grid.bound:g} leaves no "
                f"room for the gradient sum: a site's noise share alone reaches "
                f"+-{self.noise_bound:.4g} (with probability 1 - "
                f"{self.clip_probability():.1e} over the run); set it to at least "
                f"{need:g}, and above the noise bound by the largest per-coordinate "
                f"gradient sum a site may send (<= its records x "
                f"privacy.max_grad_norm)")

    def encode(self, total: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, int]:
        """The site's share: ``total`` (its clipped-gradient sum, flat float) ->
        (grid points to send, float64; how many coordinates the box clipped)."""
        self.check()
        box = self.data_bound
        clipped = int(np.count_nonzero(np.abs(total) > box))
        ints = np.rint(np.clip(total, -box, box) / self.grid.step).astype(np.int64)
        noise = discrete_gaussian(self.share_sigma, ints.shape, rng)
        half = self.grid.levels // 2
        # the clipped-noise event (probability <= delta_c, counted in delta)
        noised = np.clip(ints + noise, -half, half)
        return self.grid.to_float(noised), clipped


def discrete_gaussian(sigma: float, shape: tuple[int, ...],
                      rng: np.random.Generator) -> np.ndarray:
    """Samples of the discrete Gaussian ``N_Z(0, sigma^2)`` (``P(x) ~ exp(-x^2 /
    (2 sigma^2))`` on the integers): Canonne, Kamath and Steinke's rejection
    sampler (Algorithm 3) from the discrete Laplace of scale ``floor(sigma) + 1``,
    vectorised, with numpy's floating-point geometric and uniform draws (as TF
    Privacy's sampler)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    size = int(np.prod(shape, dtype=np.int64))
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)  # geometric success probability 1 - e^(-1/t)
    out = np.empty(size, np.int64)
    filled = 0
    while filled < size:
        want = max(64, int(1.6 * (size - filled)))
        lap = rng.geometric(p, want) - rng.geometric(p, want)  # discrete Laplace
        gap = np.abs(lap) - sigma * sigma / t
        keep = lap[rng.random(want) < np.exp(-gap * gap / (2.0 * sigma * sigma))]
        take = min(len(keep), size - filled)
        out[filled:filled + take] = keep[:take]
        filled += take
    return out.reshape(shape)
