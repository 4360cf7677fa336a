"""Privacy accounting as pure functions: epsilon, noise calibration, noise plans.

A site's spending is the list of ``(noise_multiplier, sample_rate, steps)``
segments that Opacus' accountants keep as ``history``, so epsilon after any number
of rounds is recomputed from that list exactly as one long Opacus run would compute
it. Both sides use these: the site to calibrate and charge its noise, the operator's
planner (:mod:`fedtune.common.planning`) to predict it before a run.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from fedtune.common.config import PrivacyConfig, RunConfig
from fedtune.common.errors import PrivacyError

Segment = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


# Opacus' RDP orders (1.1 ... 63) plus higher ones: a class histogram released
# with large noise is tightest at orders above 63, where Opacus' own list ends
# (its answer would be a valid but loose epsilon).
RDP_ORDERS = [*RDPAccountant.DEFAULT_ALPHAS, 80, 100, 128, 160, 200, 256, 384, 512]


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
    if accountant == "rdp":  # Opacus' RDPAccountant.get_privacy_spent, per segment
        rdp = np.sum([np.asarray(_rdp_per_step(s, q)) * n for s, q, n in segments],
                     axis=0)
        with warnings.catch_warnings():  # an optimum at the last order: still valid
            warnings.simplefilter("ignore")
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp,
                                                    delta=delta)
        return float(eps)
    acc = _accountant(accountant)
    acc.history = segments
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one subsampled-Gaussian step at every order (linear in the steps;
    cached: plans and ledgers meet the same (sigma, q) again and again)."""
    return tuple(float(v) for v in np.atleast_1d(rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=sigma, steps=1, orders=RDP_ORDERS)))


def calibrate_noise(*, target_epsilon: float, target_delta: float, sample_rate: float,
                    steps: int, accountant: str = "rdp",
                    prefix: Sequence[Segment] = ()) -> float:
    """Smallest noise multiplier that keeps ``steps`` steps within the target.

    ``prefix``: releases already planned before these steps (a class histogram, a
    linear-probe phase); the result keeps their exact composition within the
    target.
    """
    return _calibrate(float(target_epsilon), float(target_delta), float(sample_rate),
                      int(steps), accountant,
                      tuple((float(n), float(q), int(k)) for n, q, k in prefix))


@functools.lru_cache(maxsize=1024)
def _calibrate(target_epsilon: float, target_delta: float, sample_rate: float,
               steps: int, accountant: str, prefix: tuple[Segment, ...]) -> float:
    """:func:`calibrate_noise`, cached: a site plans the same noise in its privacy plan
    and in every round (one search costs ~1.4 s of Opacus' bisection on a CPU)."""
    if prefix:
        return _bisect_noise(prefix, target_epsilon=target_epsilon,
                             target_delta=target_delta, sample_rate=sample_rate,
                             steps=steps, accountant=accountant)
    try:
        with warnings.catch_warnings():  # Opacus' search tries far-off sigmas too
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=target_delta,
                sample_rate=sample_rate, steps=steps, accountant=accountant))
    except ValueError as err:
        raise PrivacyError(f"cannot reach epsilon={target_epsilon} in {steps} steps at "
                           f"sample rate {sample_rate:.4f}: {err}") from err


def _bisect_noise(prefix: Sequence[Segment], *, target_epsilon: float,
                  target_delta: float, sample_rate: float, steps: int,
                  accountant: str) -> float:
    def eps(sigma: float) -> float:
        with warnings.catch_warnings():  # far-off trial sigmas sit at Opacus'
            warnings.simplefilter("ignore")  # last RDP order; only the answer counts
            return epsilon_spent([*prefix, (sigma, sample_rate, steps)],
                                 delta=target_delta, accountant=accountant)

    if epsilon_spent(prefix, delta=target_delta, accountant=accountant) \
            >= target_epsilon:
        raise PrivacyError(f"the releases planned before training already spend "
                           f"epsilon >= {target_epsilon}: raise "
                           "privacy.target_epsilon, "
                           "or the noise of those releases (privacy."
                           "count_noise_multiplier for the class histogram, "
                           "privacy.calibration_noise_multiplier for the decision "
                           "calibration), or switch them off (train.logit_adjustment"
                           " 0, train.calibrate_decisions false)")
    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise PrivacyError(f"cannot reach epsilon={target_epsilon} in {steps} "
                               f"steps at sample rate {sample_rate:.4f}")
    while hi - lo > 1e-3 * hi:  # sigma to 0.1 %: epsilon stays <= the target
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    return hi


def sample_rate(*, batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate for an expected batch of ``batch_size``."""
    return min(1.0, batch_size / max(1, num_examples))


def steps_per_round(*, q: float, epochs: int, max_steps: int) -> int:
    """Optimizer steps one local round takes (what the trainer will do)."""
    if max_steps > 0:
        return max_steps
    return epochs * max(1, int(1 / q))


@dataclass(frozen=True)
class NoisePlan:
    """The noise of one site's whole run, planned before its first step.

    ``count_sigma``: the class-histogram release (0: none); ``probe_sigma``: the
    first ``probe_rounds`` (head-only) rounds, ``probe_steps`` steps each;
    ``tune_sigma``: the rest, ``tune_steps`` steps each; ``calibration_sigma``:
    the decision calibration's counts after the last round (0: none).
    """

    count_sigma: float
    probe_sigma: float
    tune_sigma: float
    probe_rounds: int
    probe_steps: int
    tune_steps: int
    calibration_sigma: float = 0.0

    def sigma(self, round_: int) -> float:
        """The DP-SGD noise multiplier of round ``round_``."""
        return self.probe_sigma if round_ <= self.probe_rounds else self.tune_sigma

    def steps(self, round_: int) -> int:
        """The DP-SGD steps round ``round_`` takes."""
        return self.probe_steps if round_ <= self.probe_rounds else self.tune_steps

    def history(self, *, q: float, rounds: int, ended: bool = False
                ) -> list[Segment]:
        """The releases of the first ``rounds`` rounds, as planned (``ended``: and
        the decision calibration after the last one)."""
        out: list[Segment] = [(self.count_sigma, 1.0, 1)] if self.count_sigma else []
        if ended and self.calibration_sigma:
            out.append((self.calibration_sigma, 1.0, 1))
        probe = min(rounds, self.probe_rounds)
        if probe:
            out.append((self.probe_sigma, q, self.probe_steps * probe))
        if rounds > probe:
            out.append((self.tune_sigma, q,
                        self.tune_steps * (rounds - probe)))
        return out


def round_sampling(cfg: RunConfig, *, num_examples: int, round_: int
                   ) -> tuple[float, int]:
    """(Poisson sampling rate, optimizer steps) of round ``round_`` at a site of
    ``num_examples`` training records: what its trainer will do, and what its
    plan and its ledger count."""
    t = cfg.phase(round_, num_examples)
    q = sample_rate(batch_size=t.batch_size, num_examples=num_examples)
    return q, steps_per_round(q=q, epochs=t.local_epochs, max_steps=t.max_steps)


def run_plan(cfg: RunConfig, *, num_examples: int, count: bool | None = None
             ) -> tuple[float, NoisePlan]:
    """(sampling rate, noise plan) of a site with ``num_examples`` training records
    under the run's config: its sampling rate and each phase's steps per round."""
    q, probe = round_sampling(cfg, num_examples=num_examples, round_=1)
    _, tune = round_sampling(cfg, num_examples=num_examples,
                             round_=cfg.probe_rounds + 1)
    return q, plan_schedule(
        cfg.privacy, q=q, round_steps=tune,
        num_rounds=cfg.federation.num_rounds,
        probe_rounds=cfg.probe_rounds, probe_steps_per_round=probe,
        count=cfg.releases_class_histogram if count is None else count,
        calibration_sigma=cfg.calibration_sigma if cfg.calibrates else 0.0)


def plan_schedule(cfg: PrivacyConfig, *, q: float, round_steps: int,
                  num_rounds: int, probe_rounds: int = 0, count: bool = False,
                  probe_steps_per_round: int = 0, calibration_sigma: float = 0.0
                  ) -> NoisePlan:
    """Noise for a run of ``num_rounds`` rounds whose first ``probe_rounds`` train
    the head only (``probe_steps_per_round`` steps each; 0: ``round_steps``),
    after a class-histogram release when ``count`` and before the decision
    calibration's release of noise ``calibration_sigma`` (0: none).

    With ``cfg.linear_probe_budget`` the histogram and the probe rounds spend that
    share of ``target_epsilon`` and the later rounds are calibrated so that the
    exact composition of everything spends the target; otherwise one noise level
    serves every round. A fixed ``cfg.noise_multiplier`` is used as it is.
    """
    probe_rounds = min(probe_rounds, num_rounds)
    probe_steps = probe_steps_per_round or round_steps
    tune_rounds = num_rounds - probe_rounds
    count_sigma = cfg.count_noise_multiplier if count else 0.0
    prefix: list[Segment] = [(count_sigma, 1.0, 1)] if count else []
    if calibration_sigma:  # composition does not depend on the order of releases
        prefix.append((calibration_sigma, 1.0, 1))

    def plan(probe: float, tune: float) -> NoisePlan:
        return NoisePlan(count_sigma, probe, tune, probe_rounds, probe_steps,
                         round_steps, calibration_sigma)

    if cfg.noise_multiplier > 0:
        return plan(cfg.noise_multiplier, cfg.noise_multiplier)
    calibrate = functools.partial(
        calibrate_noise, target_delta=cfg.target_delta, sample_rate=q,
        accountant=cfg.accountant)
    if cfg.linear_probe_budget and probe_rounds and tune_rounds:
        probe = calibrate(target_epsilon=cfg.linear_probe_budget * cfg.target_epsilon,
                          steps=probe_steps * probe_rounds, prefix=prefix)
        prefix.append((probe, q, probe_steps * probe_rounds))
        tune = calibrate(target_epsilon=cfg.target_epsilon, prefix=prefix,
                         steps=round_steps * tune_rounds)
        return plan(probe, tune)
    sigma = calibrate(
        target_epsilon=cfg.target_epsilon, prefix=prefix,
        steps=probe_steps * probe_rounds + round_steps * tune_rounds)
    return plan(sigma, sigma)


def class_prior(counts: Sequence[float]) -> list[float]:
    """A prior from (noisy) counts: every class keeps at least half a record, so a
    class the site lacks, or whose noisy count fell below 0, gets a small, finite
    log-prior."""
    clamped = [max(float(c), 0.5) for c in counts]
    total = sum(clamped)
    return [c / total for c in clamped]


def class_weights(prior: Sequence[float], *, mode: str) -> list[float]:
    """Per-class record weights in (0, 1]: inverse frequency (``balanced``) or its
    square root (``sqrt``), scaled so the rarest class weighs 1."""
    if mode == "none":
        return [1.0] * len(prior)
    power = 1.0 if mode == "balanced" else 0.5
    low = min(prior)
    return [(low / p) ** power for p in prior]
