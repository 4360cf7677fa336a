"""The site's one privacy entry point: :func:`open_round` plans what a round may
spend and returns the trainer's inputs with :meth:`RoundPrivacy.charge`, which books
what the round did in the run's state and the persistent ledger.

The accounting itself is pure (:mod:`fedtune.common.accounting`, which the planner
and the server use too); DP-SGD's mechanics are :mod:`fedtune.client.dpsgd`; the
class histogram and the terms taken from it are :mod:`fedtune.client.recipe`.
:class:`PrivacyState` keeps a site's segments across rounds (in the ClientApp's
``Context.state``) and never leaves the site: only the resulting epsilon is
reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedtune.client import recipe
from fedtune.client.releases import HISTOGRAM, ROUND, SHARE, Book, Releases
from fedtune.common import records
from fedtune.common.accounting import (
    NoisePlan,
    Segment,
    epsilon_spent,
    round_sampling,
    run_plan,
)
from fedtune.common.config import PrivacyConfig, RunConfig, TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class PrivacyState:
    """A site's spending in this run, kept in the ClientApp's context state.

    ``noise_multiplier`` is the DP-SGD noise of the rounds that train LoRA;
    rounds up to ``probe_rounds`` (head-only, LP-FT) use ``probe_noise_multiplier``.
    """

    noise_multiplier: float = 0.0
    history: list[Segment] = field(default_factory=list)
    probe_noise_multiplier: float = 0.0
    probe_rounds: int = 0

    def sigma(self, round_: int) -> float:
        """The DP-SGD noise multiplier of round ``round_``."""
        if round_ <= self.probe_rounds and self.probe_noise_multiplier > 0:
            return self.probe_noise_multiplier
        return self.noise_multiplier

    def adopt(self, plan: NoisePlan) -> None:
        self.noise_multiplier = plan.tune_sigma
        self.probe_noise_multiplier, self.probe_rounds = (plan.probe_sigma,
                                                          plan.probe_rounds)

    def charge(self, *, q: float, steps: int,
               sigma: float | None = None) -> None:
        if steps > 0:
            self.history.append((self.noise_multiplier if sigma is None else sigma,
                                 q, steps))

    def epsilon(self, cfg: PrivacyConfig) -> float:
        return epsilon_spent(self.history, delta=cfg.target_delta,
                             accountant=cfg.accountant)

    def to_config(self) -> dict[str, float | list[float] | list[int]]:
        return {"noise-multiplier": self.noise_multiplier,
                "probe-noise-multiplier": self.probe_noise_multiplier,
                "probe-rounds": self.probe_rounds,
                "sigma": [h[0] for h in self.history],
                "rate": [h[1] for h in self.history],
                "steps": [h[2] for h in self.history]}

    @classmethod
    def from_config(cls, rec: Mapping[str, Any] | None) -> PrivacyState:
        if not rec:
            return cls()
        hist = zip(rec["sigma"], rec["rate"], rec["steps"], strict=True)
        return cls(noise_multiplier=float(rec["noise-multiplier"]),
                   history=[(float(s), float(q), int(n)) for s, q, n in hist],
                   probe_noise_multiplier=float(rec.get("probe-noise-multiplier",
                                                        0.0)),
                   probe_rounds=int(rec.get("probe-rounds", 0)))


def round_kind(cfg: RunConfig) -> str:
    """A round's release: a DP-SGD round, or a noise share (distributed noise:
    one full-batch step, the noise pooled under SecAgg+)."""
    return SHARE if cfg.privacy.noise == "distributed" else ROUND


@dataclass
class RoundPrivacy:
    """What one round may spend, from :func:`open_round`: the trainer's inputs
    (phase, noise, sample rate, class terms) and :meth:`charge`, the one call that
    books what the round did."""

    cfg: RunConfig
    round_: int
    train_cfg: TrainConfig
    head_only: bool
    noise_multiplier: float
    sample_rate: float
    terms: recipe.ClassTerms
    state: PrivacyState
    prior: list[float] | None  # the released class histogram (stays on the site)
    releases: Releases

    @property
    def kind(self) -> str:
        return round_kind(self.cfg)

    def charge(self, *, steps: int, sigma: float | None = None) -> dict[str, float]:
        """Book ``steps`` DP-SGD steps (:meth:`Releases.charge`) at the planned
        noise, or at ``sigma`` where the release carried less; returns the DP
        metrics of the reply (empty when DP is off: no epsilon key at all means
        not private)."""
        if sigma is not None and sigma > self.noise_multiplier:
            raise ValueError("a release is charged at most at its planned noise")
        if sigma is not None:
            self.noise_multiplier = sigma
        self.releases.charge(self.kind, (self.noise_multiplier, self.sample_rate,
                                         steps))
        found = self.releases.metrics()
        if found:
            found.update({records.NOISE_MULTIPLIER: self.noise_multiplier,
                          records.SAMPLE_RATE: self.sample_rate})
        return found


def open_round(cfg: RunConfig, *, num_examples: int, round_: int,
               labels: Callable[[], Sequence[int]],
               saved: Mapping[str, Any] | None,
               prior: Sequence[float] | None, book: Book | None,
               resumed_at: int = 0, run: str = "", message: str = "",
               seed: int = 0, run_name: str = "",
               check_noise: Callable[[list[float]], None] | None = None
               ) -> RoundPrivacy:
    """The site's privacy for one round, like Opacus' ``make_private`` for a whole
    round: plan the run's noise once (``saved`` is the state kept from earlier
    rounds, None at the first), refuse a round the ledger cannot afford or a
    non-private round under a budget, release the class histogram once (charged at
    once, ``prior`` is the one released before), and return the trainer's inputs
    with the object that charges what the round did.

    ``num_examples``: the site's training records; ``labels``: their class ids,
    asked for only when the run releases a class histogram (classification);
    ``check_noise``: the site policy's look at the planned noise multipliers, before
    anything is released or charged. Every release goes through
    :class:`~fedtune.client.releases.Releases`.
    """
    dp = cfg.privacy.enabled
    train_cfg = cfg.phase(round_, num_examples)  # a head round's own lr, steps
    q, planned = round_sampling(cfg, num_examples=num_examples, round_=round_)
    state = PrivacyState.from_config(dict(saved) if saved is not None else None)
    if dp and state.noise_multiplier == 0.0:
        _, plan = run_plan(cfg, num_examples=num_examples)
        state.adopt(plan)
        if saved is None and resumed_at > 1:
            # A resumed run: this process never saw rounds 1..resumed_at-1. Count
            # them as if the site took part in each (an upper bound).
            state.history += plan.history(q=q, rounds=resumed_at - 1)
    sigma = state.sigma(round_)
    releases = Releases(cfg.privacy, state.history, book, run=run, round_=round_,
                        message=message, run_name=run_name, check_noise=check_noise)
    counting = cfg.releases_class_histogram
    release = counting and prior is None
    histogram = [recipe.histogram_segment(cfg)] if release and dp else []
    if not dp:
        logger.warning("DP is OFF on this site: the adapter update is not "
                       "differentially private (privacy.enabled=false)")
    releases.check(round_kind(cfg), *histogram, (sigma, q, planned),
                   noise=[state.noise_multiplier, state.probe_noise_multiplier])
    released = list(prior) if prior is not None else None
    if release:
        released = recipe.release_histogram(cfg, [int(y) for y in labels()],
                                            seed=seed)
        if histogram:
            releases.charge(HISTOGRAM, histogram[0])
    return RoundPrivacy(
        cfg=cfg, round_=round_, train_cfg=train_cfg,
        head_only=cfg.head_only(round_), noise_multiplier=sigma,
        sample_rate=q, terms=recipe.class_terms(cfg, released if counting else None),
        state=state, prior=released, releases=releases)
