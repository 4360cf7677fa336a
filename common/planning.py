"""Privacy-utility planning: will DP-SGD on these sites learn anything?

The noise DP-SGD adds to one step's averaged gradient has an expected L2 norm of
``sigma * C * sqrt(d) / B`` (``d`` trainable dimensions, expected batch ``B``,
clipping bound ``C``), while the averaged clipped gradient itself is at most ``C``.
Over the ``T`` steps of a round the signal adds up and the noise only as ``sqrt(T)``,
so the figure that decides whether a site learns is

    round noise ratio  rho = sigma * sqrt(d) / (B * sqrt(T))

(noise norm over the clipping bound, for one site's round). The federation averages
the sites' updates with weights ``w_i`` (their share of the aggregate): the noise
of the average is ``sqrt(sum w_i^2 rho_i^2)`` of a signal that adds up, so a tiny
site weighs in by its share, and the federation's verdict is read off that figure
(:func:`aggregate_rho`). Everything here is pure arithmetic on sizes and the
accountant; the thresholds come from measured runs, per task (:data:`THRESHOLDS`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedtune.common import accounting, distributed_noise, recipes
from fedtune.common.config import RunConfig
from fedtune.common.errors import PrivacyError


@dataclass(frozen=True)
class Thresholds:
    """Where a round noise ratio turns from learning to marginal to nothing, and
    the measured runs the numbers come from."""

    learns: float
    marginal: float
    measured_on: str


# Measured per task; the plan prints ``measured_on`` beside its verdict.
THRESHOLDS = {
    "classification": Thresholds(
        0.5, 2.0, "MiniLM classifiers at epsilon 8 (bench/privacy_utility.py): the "
        "ICD-10 default learns every class at rho < 0.1; the drug reviews, LoRA "
        "from round 1, learn only the class prior at rho 2-6"),
    "causal-lm": Thresholds(
        0.5, 2.0, "two scenarios judged by their answers (exact match), not their "
        "loss: simulations/instruct.yaml (SmolLM2-135M, LoRA on the top layer, 8 "
        "sites of 1,000 prompts) at rho 0.27 per site, 0.095 in the aggregate, "
        "answers 0.331 ± 0.009 over 3 runs at epsilon 8 against 0.396 without DP "
        "(bench/results/sft_map.json); simulations/causal-lm.yaml (4 sites of 32) "
        "at rho 36.8 answers nothing right (exact 0; non-private sentiment 0.78). "
        "No run lies between them, so the bounds are the classification ones, "
        "which bracket both"),
}
LEARNS, MARGINAL = (THRESHOLDS["classification"].learns,
                    THRESHOLDS["classification"].marginal)
VERDICTS = ("expected to learn", "marginal", "will learn nothing")


def noise_to_clip(*, sigma: float, dims: int, batch: float) -> float:
    """Expected noise norm on one step's averaged gradient over the clipping
    bound: ``sigma * sqrt(d) / B``."""
    return sigma * math.sqrt(dims) / max(batch, 1e-9)


def round_noise_ratio(*, sigma: float, dims: int, batch: float, steps: int) -> float:
    """``rho``: the noise of a round's ``steps`` steps over their summed signal."""
    return noise_to_clip(sigma=sigma, dims=dims, batch=batch) / math.sqrt(
        max(steps, 1))


def verdict(rho: float, task: str = "classification") -> str:
    """The words for a round noise ratio, by the task's measured thresholds."""
    t = THRESHOLDS[task]
    if rho <= t.learns:
        return VERDICTS[0]
    return VERDICTS[1] if rho <= t.marginal else VERDICTS[2]


@dataclass(frozen=True)
class SitePlan:
    """One site's planned DP-SGD, before any training."""

    site: str
    records: int  # training records (after the validation split)
    sample_rate: float
    steps: int  # per LoRA round
    sigma: float  # the LoRA rounds' noise multiplier
    dims: int  # trainable dimensions of the LoRA rounds
    probe_steps: int  # per head-only round
    probe_sigma: float
    probe_dims: int  # of the head-only rounds (0: none)
    rho: float  # worst round noise ratio over the run's phases
    verdict: str
    advice: str
    share: float = 1.0  # its weight in the aggregate (federation.weighting)


Phase = tuple[str, float, int, int]  # name, sigma, steps per round, dimensions


def _phases(cfg: RunConfig, plan: accounting.NoisePlan, *, dims: int,
            probe_dims: int) -> list[Phase]:
    """Each phase the run has."""
    out = []
    if plan.probe_rounds:
        out.append(("head-only", plan.probe_sigma, plan.probe_steps, probe_dims))
    if cfg.federation.num_rounds > plan.probe_rounds:
        out.append(("LoRA", plan.tune_sigma, plan.tune_steps, dims))
    return out


def _worst(phases: Sequence[Phase], batch: float) -> tuple[Phase, float]:
    """The phase with the largest round noise ratio, and that ratio."""
    rated = [(p, round_noise_ratio(sigma=p[1], dims=p[3], batch=batch, steps=p[2]))
             for p in phases]
    return max(rated, key=lambda pr: pr[1])


def plan_site(cfg: RunConfig, *, site: str, records: int, dims: int,
              probe_dims: int = 0, count: bool = False) -> SitePlan:
    """Plan one site of ``records`` training records (``dims``/``probe_dims``:
    trainable dimensions of the LoRA and head-only rounds)."""
    q, plan = accounting.run_plan(
        replace(cfg, privacy=replace(cfg.privacy, enabled=True)),
        num_examples=records, count=count)
    if not cfg.privacy.enabled:
        return SitePlan(site, records, q, plan.tune_steps, 0.0, dims,
                        plan.probe_steps, 0.0, probe_dims, 0.0, "DP off",
                        "no noise: the update is not private")
    phases = _phases(cfg, plan, dims=dims, probe_dims=probe_dims)
    worst, rho = _worst(phases, q * records)
    words = verdict(rho, cfg.model.task)
    advice = "" if words == VERDICTS[0] else _advice(
        cfg, records=records, rho=rho, worst=worst, batch=q * records,
        dims=dims, probe_dims=probe_dims, count=count)
    return SitePlan(site, records, q, plan.tune_steps, plan.tune_sigma, dims,
                    plan.probe_steps, plan.probe_sigma, probe_dims, rho, words,
                    advice)


def _advice(cfg: RunConfig, *, records: int, rho: float, worst: Phase, batch: float,
            dims: int, probe_dims: int, count: bool) -> str:
    """What would bring ``rho`` down to the task's "learns" threshold, each with
    the key that does it: more records at the same sampling rate, a larger
    epsilon, fewer trainable dimensions in the worst phase, or head-only rounds."""
    learns = THRESHOLDS[cfg.model.task].learns
    name, sigma, steps, d = worst
    need_records = math.ceil(records * rho / learns)
    need_dims = max(1, int(d * (learns / rho) ** 2))
    eps_text = "no privacy.target_epsilon up to 1000"
    eps = _epsilon_to_learn(cfg, records=records, dims=dims, probe_dims=probe_dims,
                            count=count)
    if eps is not None and eps <= 1000.0:
        eps_text = f"privacy.target_epsilon >= {eps:.3g}"
    keys = ("lora.r, lora.target_modules or lora.ffa" if name == "LoRA"
            else "model.head_hidden 0")
    out = [f"need >= {need_records} records at this sampling rate", eps_text,
           f"<= {need_dims} trainable parameters in the {name} rounds (now {d}; "
           f"{keys})"]
    if name == "LoRA" and probe_dims and round_noise_ratio(
            sigma=sigma, dims=probe_dims, batch=batch, steps=steps) <= learns:
        out.append(f"train.linear_probe_rounds: -1 (every round head only: "
                   f"{probe_dims} parameters)")
    return ", or ".join(out)


def _epsilon_to_learn(cfg: RunConfig, *, records: int, dims: int, probe_dims: int,
                      count: bool) -> float | None:
    """The smallest target epsilon at which every phase's ``rho`` is within the
    task's "learns" threshold (``None``: no epsilon helps, e.g. a fixed noise
    multiplier).

    With one noise level for the whole run ``rho`` is linear in it, so the largest
    noise that learns is read off each phase and its epsilon computed once; with a
    budget split between phases the target is searched (each probe a calibration).
    """
    priv, learns = cfg.privacy, THRESHOLDS[cfg.model.task].learns
    if priv.noise_multiplier > 0:
        return None
    q, plan = accounting.run_plan(cfg, num_examples=records, count=count)
    batch = q * records
    if not (priv.linear_probe_budget and 0 < plan.probe_rounds
            < cfg.federation.num_rounds):
        sigma = min(learns * batch * math.sqrt(max(steps, 1)) / math.sqrt(d)
                    for _, _, steps, d in _phases(cfg, plan, dims=dims,
                                                  probe_dims=probe_dims))
        at = replace(plan, probe_sigma=sigma, tune_sigma=sigma)
        with warnings.catch_warnings():  # an optimum at the last RDP order
            warnings.simplefilter("ignore")
            return accounting.epsilon_spent(
                at.history(q=q, rounds=cfg.federation.num_rounds,
                           ended=True),
                delta=priv.target_delta, accountant=priv.accountant)

    def rho_at(eps: float) -> float:
        at = replace(cfg, privacy=replace(priv, target_epsilon=eps))
        q, plan = accounting.run_plan(at, num_examples=records, count=count)
        return _worst(_phases(cfg, plan, dims=dims, probe_dims=probe_dims),
                      q * records)[1]

    lo, hi = priv.target_epsilon, 1000.0
    try:
        with warnings.catch_warnings():  # Opacus' RDP orders end near eps 1000
            warnings.simplefilter("ignore")
            if rho_at(hi) > learns:
                return None
            for _ in range(7):  # epsilon to ~4 % (advice, not accounting)
                mid = math.sqrt(lo * hi)
                lo, hi = (lo, mid) if rho_at(mid) <= learns else (mid, hi)
    except PrivacyError:
        return None
    return hi


def shares(records: Sequence[int], weighting: str) -> list[float]:
    """Each site's weight in the average (``federation.weighting``)."""
    raw = [1.0 if weighting == "uniform" else
           float(n) ** (0.5 if weighting == "sqrt" else 1.0) for n in records]
    total = sum(raw) or 1.0
    return [w / total for w in raw]


def typical_site(records: Sequence[int], weighting: str) -> float | None:
    """The records of the site a unit of the aggregate's weight sits on: each
    site's records weighted by its share (``federation.weighting``; by records,
    sum(n^2) / sum(n)). Sites of one size: that size. Where a few large sites
    hold most records, theirs, not the median's: they steer the average. None
    without sites."""
    if not records:
        return None
    return sum(w * n for w, n in zip(shares(records, weighting), records, strict=True))


def aggregate_rho(plans: Sequence[SitePlan], cfg: RunConfig) -> float:
    """The round noise ratio of the aggregate, ``sqrt(sum (w_i rho_i)^2)``: the
    sites' noise is independent and averages out by their shares ``w_i``, while
    their signals add up. With ``fraction_train`` < 1 a round averages only the
    sampled sites, whose shares are larger by ``sites / sampled``."""
    if not plans:
        return math.inf
    sampled = min(len(plans), cfg.federation.train_nodes)
    if cfg.privacy.noise == "distributed":
        return pooled_rho(plans, cfg)
    return math.sqrt(len(plans) / sampled * sum((p.share * p.rho) ** 2
                                                for p in plans))


def mechanism(cfg: RunConfig, *, sigma: float, dims: int
              ) -> distributed_noise.Mechanism:
    """A distributed-noise round's mechanism under the run's config: noise
    multiplier ``sigma`` on ``dims`` trained coordinates (``n``: the sites a round
    trains)."""
    fed, priv = cfg.federation, cfg.privacy
    return distributed_noise.Mechanism(
        sigma=sigma, clip=priv.max_grad_norm, sites=fed.train_nodes,
        margin=priv.max_dropped_or_colluding, dims=dims, rounds=fed.num_rounds,
        epsilon=priv.target_epsilon, delta=priv.target_delta,
        grid=distributed_noise.Grid(fed.secagg_clipping_range,
                                    distributed_noise.levels_for(fed.train_nodes)))


def grid_problem(plans: Sequence[SitePlan], cfg: RunConfig) -> str | None:
    """Under distributed noise, why SecAgg+'s grid cannot hold the planned
    shares (None: it can): its range leaves no room for the noise, or its levels
    are too coarse (:meth:`~fedtune.common.distributed_noise.Mechanism.check`)."""
    if cfg.privacy.noise != "distributed" or not cfg.privacy.enabled or not plans:
        return None
    worst = max(plans, key=lambda p: max(p.sigma, p.probe_sigma))
    try:
        mechanism(cfg, sigma=max(worst.sigma, worst.probe_sigma),
                  dims=max(worst.dims, worst.probe_dims, 1)).check()
    except ValueError as err:
        return str(err)
    return None


def pooled_rho(plans: Sequence[SitePlan], cfg: RunConfig) -> float:
    """The aggregate's round noise ratio under distributed noise: one noise of
    ``sigma sqrt(n / (n - t))`` (every share present; ``n - t`` carry ``sigma``)
    over the records of the ``n`` sites a round pools (one full-batch step:
    ``rho_i * records_i = sigma sqrt(d)``), not ``sqrt(n)`` noises over them."""
    n = min(len(plans), cfg.federation.train_nodes)
    return pooled_ratio([(p.records, p.rho) for p in plans], shares=n,
                        honest=n - cfg.privacy.max_dropped_or_colluding,
                        sampled=n / len(plans))


def pooled_ratio(rated: Sequence[tuple[float, float]], *, shares: int, honest: int,
                 sampled: float = 1.0) -> float:
    """:func:`pooled_rho` on ``(records, rho)`` per site: the noise
    ``max(records * rho) sqrt(shares / honest)`` (``sigma sqrt(d)``, every one of
    ``shares`` present, ``honest`` of them carrying ``sigma``) over the records
    a round pools (``sampled``: the share of the sites a round trains)."""
    noise = max(n * rho for n, rho in rated) * math.sqrt(shares / max(1, honest))
    return noise / (sampled * sum(n for n, _ in rated))


def overall(plans: Sequence[SitePlan], cfg: RunConfig) -> str:
    """The federation's verdict: what the aggregate will see
    (:func:`aggregate_rho`), by the task's thresholds."""
    if not plans:
        return "no sites"
    if not cfg.privacy.enabled:
        return "DP off"
    if grid_problem(plans, cfg):
        return "refused: SecAgg+'s grid cannot hold the noise shares (above)"
    return verdict(aggregate_rho(plans, cfg), cfg.model.task)


def model_dims(cfg: RunConfig, net: Any = None) -> tuple[int, int]:
    """Trainable dimensions of the LoRA rounds and of the head-only rounds (0
    when the run has none), counted on the real model (``net``: one already
    built for this config, left as it was found)."""
    from fedtune.common.model import (
        build_model,
        set_adapter_trainable,
        trainable_parameters,
    )

    if net is None:
        net = build_model(cfg.model, cfg.lora, num_labels=len(cfg.data.labels),
                          seed=cfg.train.seed)
    dims = trainable_parameters(net)
    if not cfg.probe_rounds:
        return dims, 0
    set_adapter_trainable(net, cfg.lora, trainable=False)
    probe = trainable_parameters(net)
    set_adapter_trainable(net, cfg.lora, trainable=True)
    return dims, probe


def plan_sites(cfg: RunConfig, sites: Sequence[tuple[str, int]], *,
               dims: tuple[int, int]) -> list[SitePlan]:
    """A :class:`SitePlan` for each ``(name, training records)``, with its share
    of the aggregate."""
    done: dict[int, SitePlan] = {}  # sites of one size share a plan
    weights = shares([n for _, n in sites], cfg.federation.weighting)
    out = []
    for (name, n), share in zip(sites, weights, strict=True):
        if n not in done:
            done[n] = plan_site(cfg, site=name, records=n, dims=dims[0],
                                probe_dims=dims[1],
                                count=cfg.releases_class_histogram)
        out.append(replace(done[n], site=name, share=share))
    return out


def head_length(cfg: RunConfig, records: float | None) -> str:
    """The head rounds' batch and steps per round at a site of ``records``
    (the median), as :mod:`fedtune.common.recipes` sets them, and an explicit
    length's cost by its replayed map."""
    r = recipes
    n = round(records) if records else None
    if cfg.privacy.noise == "distributed":
        return ("head rounds: one full-batch DP step per round over every site's "
                "records (distributed noise), the server's Adam at federation."
                f"server_learning_rate {cfg.federation.server_learning_rate:g}")
    line = (f"head rounds: batch {r.BATCH} (at most a site's records) and "
            f"sqrt(records) DP steps per round within {r.HEAD_STEPS[0]}.."
            f"{r.HEAD_STEPS[1]}, the best count at every size in the replayed map "
            f"({r.STEPS_SOURCE})")
    if n is None:
        return line
    rule = r.head_steps(n)
    t = cfg.phase(1, n)
    steps = accounting.steps_per_round(
        q=accounting.sample_rate(batch_size=t.batch_size, num_examples=n),
        epochs=t.local_epochs, max_steps=t.max_steps)
    at = f" at the median site's {n:,} records"
    if steps == rule and t.batch_size == r.BATCH:
        return line + f": {rule} steps{at}"
    keys = [f"train.{k}={getattr(cfg.train, k)}" for k in
            ("batch_size", "linear_probe_epochs", "max_steps")
            if getattr(cfg.train, k)]
    out = (f"head rounds: {' '.join(keys)} overrides the recipe's length: batch "
           f"{t.batch_size}, {steps} steps per round{at}, where the rule takes "
           f"batch {r.BATCH} and {rule} steps")
    size = min(r.STEPS_MAP, key=lambda m: abs(m - n))
    row = r.STEPS_MAP[size]
    near = min(row, key=lambda m: abs(m - steps))
    best = max(row.values())
    if row[near] < best - 0.01:
        out += (f", predicted to cost {best - row[near]:.3f} macro-F1 (the map at "
                f"{size:,} records/site: {near} steps {row[near]:.3f}, the best "
                f"{best:.3f})")
    small = min(n, t.batch_size) < (128 + r.BATCH) / 2  # nearer 128 than 512
    if small and min(n, r.BATCH) > min(n, t.batch_size) and \
            r.BATCH_128_COST[size] > 0.01:
        out += (f", its batch predicted to cost {r.BATCH_128_COST[size]:.3f} "
                f"macro-F1 (the map at {size:,} records/site: batch 128 against 512)")
    return out
