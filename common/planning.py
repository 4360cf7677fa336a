"""Privacy-utility planning: will DP-SGD on these sites learn anything?

The noise DP-SGD adds to one step's averaged gradient has an expected L2 norm of
``sigma * C * sqrt(d) / B`` (``d`` trainable dimensions, expected batch ``B``,
clipping bound ``C``), while the averaged clipped gradient itself is at most ``C``.
Over the ``T`` steps of a round the signal adds up and the noise only as ``sqrt(T)``,
so the figure that decides whether a site learns is

    round noise ratio  rho = sigma * sqrt(d) / (B * sqrt(T))

(noise norm over the clipping bound, for one site's round). Everything here is pure
arithmetic on sizes and the accountant; the thresholds come from measured runs
(bench/privacy_utility.py, README "Will it learn?").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedtune.common import accounting, data
from fedtune.common.config import RunConfig
from fedtune.common.errors import PrivacyError

# Measured (bench/privacy_utility.py): the drug-review default, which learns only
# the class prior at epsilon 8, sits at rho ~ 2-4; the ICD-10 default, which
# learns every class, at rho < 0.1.
LEARNS, MARGINAL = 0.5, 2.0
VERDICTS = ("expected to learn", "marginal", "will learn nothing")


def noise_to_clip(*, sigma: float, dims: int, batch: float) -> float:
    """Expected noise norm on one step's averaged gradient over the clipping
    bound: ``sigma * sqrt(d) / B``."""
    return sigma * math.sqrt(dims) / max(batch, 1e-9)


def round_noise_ratio(*, sigma: float, dims: int, batch: float, steps: int) -> float:
    """``rho``: the noise of a round's ``steps`` steps over their summed signal."""
    return noise_to_clip(sigma=sigma, dims=dims, batch=batch) / math.sqrt(
        max(steps, 1))


def verdict(rho: float) -> str:
    """The words for a round noise ratio."""
    if rho <= LEARNS:
        return VERDICTS[0]
    return VERDICTS[1] if rho <= MARGINAL else VERDICTS[2]


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


def _rho(cfg: RunConfig, plan: accounting.NoisePlan, *, batch: float, dims: int,
         probe_dims: int) -> float:
    """The worst phase's round noise ratio."""
    rhos = []
    if plan.probe_rounds:
        rhos.append(round_noise_ratio(sigma=plan.probe_sigma, dims=probe_dims,
                                      batch=batch, steps=plan.probe_steps))
    if cfg.federation.num_rounds > plan.probe_rounds:
        rhos.append(round_noise_ratio(sigma=plan.tune_sigma, dims=dims, batch=batch,
                                      steps=plan.tune_steps))
    return max(rhos)


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
    rho = _rho(cfg, plan, batch=q * records, dims=dims, probe_dims=probe_dims)
    words = verdict(rho)
    advice = "" if words == VERDICTS[0] else _advice(
        cfg, records=records, rho=rho, dims=dims, probe_dims=probe_dims,
        count=count)
    return SitePlan(site, records, q, plan.tune_steps, plan.tune_sigma, dims,
                    plan.probe_steps, plan.probe_sigma, probe_dims, rho, words,
                    advice)


def _advice(cfg: RunConfig, *, records: int, rho: float, dims: int,
            probe_dims: int, count: bool) -> str:
    """What would bring ``rho`` down to :data:`LEARNS`: more records at the same
    sampling rate, a larger epsilon, or fewer trainable dimensions."""
    need_records = math.ceil(records * rho / LEARNS)
    need_dims = max(1, int(dims * (LEARNS / rho) ** 2))

    eps_text = "no epsilon up to 1000"
    eps = _epsilon_to_learn(cfg, records=records, dims=dims, probe_dims=probe_dims,
                            count=count)
    if eps is not None and eps <= 1000.0:
        eps_text = f"epsilon >= {eps:.3g}"
    return (f"need >= {need_records} records at this sampling rate, or {eps_text}, "
            f"or <= {need_dims} trainable parameters (now {dims})")


def _epsilon_to_learn(cfg: RunConfig, *, records: int, dims: int, probe_dims: int,
                      count: bool) -> float | None:
    """The smallest target epsilon at which every phase's ``rho`` is within
    :data:`LEARNS` (``None``: no epsilon helps, e.g. a fixed noise multiplier).

    With one noise level for the whole run ``rho`` is linear in it, so the largest
    noise that learns is read off each phase and its epsilon computed once; with a
    budget split between phases the target is searched (each probe a calibration).
    """
    priv = cfg.privacy
    if priv.noise_multiplier > 0:
        return None
    q, plan = accounting.run_plan(cfg, num_examples=records, count=count)
    batch = q * records
    if not (priv.linear_probe_budget and 0 < plan.probe_rounds
            < cfg.federation.num_rounds):
        phases = [(plan.probe_steps, probe_dims)] if plan.probe_rounds else []
        if cfg.federation.num_rounds > plan.probe_rounds:
            phases.append((plan.tune_steps, dims))
        sigma = min(LEARNS * batch * math.sqrt(max(steps, 1)) / math.sqrt(d)
                    for steps, d in phases)
        at = replace(plan, probe_sigma=sigma, tune_sigma=sigma)
        with warnings.catch_warnings():  # an optimum at the last RDP order
            warnings.simplefilter("ignore")
            return accounting.epsilon_spent(
                at.history(sample_rate_=q, rounds=cfg.federation.num_rounds),
                delta=priv.target_delta, accountant=priv.accountant)

    def rho_at(eps: float) -> float:
        at = replace(cfg, privacy=replace(priv, target_epsilon=eps))
        q, plan = accounting.run_plan(at, num_examples=records, count=count)
        return _rho(cfg, plan, batch=q * records, dims=dims, probe_dims=probe_dims)

    lo, hi = priv.target_epsilon, 1000.0
    try:
        with warnings.catch_warnings():  # Opacus' RDP orders end near eps 1000
            warnings.simplefilter("ignore")
            if rho_at(hi) > LEARNS:
                return None
            for _ in range(7):  # epsilon to ~4 % (advice, not accounting)
                mid = math.sqrt(lo * hi)
                lo, hi = (lo, mid) if rho_at(mid) <= LEARNS else (mid, hi)
    except PrivacyError:
        return None
    return hi


def format_plan(plans: Sequence[SitePlan], cfg: RunConfig) -> str:
    """The planner's table and its overall verdict, in plain words."""
    priv = cfg.privacy
    head = (f"privacy plan: epsilon {priv.target_epsilon:g} at delta "
            f"{priv.target_delta:g} per site over {cfg.federation.num_rounds} rounds"
            if priv.enabled else "privacy plan: DP is OFF (no noise, no guarantee)")
    rounds = cfg.federation.num_rounds
    probe = min(cfg.train.linear_probe_rounds, rounds)
    lines = [head, f"{'site':<22} {'records':>8} {'q':>7} {'steps':>5} "
             f"{'sigma':>7} {'dims':>7} {'noise/C':>8} {'rho':>7}  verdict"]
    for p in plans:
        batch = p.sample_rate * p.records
        if 0 < probe < rounds:  # both phases: head-only / LoRA
            sigma = f"{p.probe_sigma:.2f}/{p.sigma:.2f}"
            dims, steps = f"{p.probe_dims}/{p.dims}", f"{p.probe_steps}/{p.steps}"
        elif probe:  # head-only rounds only
            sigma, dims, steps = f"{p.probe_sigma:.3f}", str(p.probe_dims), str(
                p.probe_steps)
        else:
            sigma, dims, steps = f"{p.sigma:.3f}", str(p.dims), str(p.steps)
        nc = (noise_to_clip(sigma=p.probe_sigma, dims=p.probe_dims, batch=batch)
              if probe == rounds else
              noise_to_clip(sigma=p.sigma, dims=p.dims, batch=batch))
        lines.append(f"{p.site:<22} {p.records:>8} {p.sample_rate:>7.4f} {steps:>5} "
                     f"{sigma:>7} {dims:>7} {nc:>8.3f} {p.rho:>7.3f}  {p.verdict}")
        if p.advice:
            lines.append(f"{'':<22} -> {p.advice}")
    phases = ("" if not probe else
              "; every round trains the head only (LoRA frozen)" if probe == rounds
              else f"; a/b: head-only rounds 1-{probe} / LoRA rounds (noise/C: the "
              "LoRA rounds')")
    lines.append(f"rho = sigma*sqrt(dims)/(batch*sqrt(steps)): <= {LEARNS} expected "
                 f"to learn, <= {MARGINAL} marginal, above: the noise drowns the "
                 "signal" + phases)
    worst = overall(plans)
    lines.append(f"overall: {worst}")
    return "\n".join(lines)


def overall(plans: Sequence[SitePlan]) -> str:
    """The worst site's verdict (one site that learns nothing weakens them all)."""
    order = {v: i for i, v in enumerate(VERDICTS)}
    return max((p.verdict for p in plans), key=lambda v: order.get(v, -1),
               default="no sites")


def simulated_sites(cfg: RunConfig) -> list[tuple[str, int]]:
    """(name, training records) of every simulated site (see
    :func:`fedtune.common.data.simulated_sites`)."""
    return data.simulated_sites(cfg)


def model_dims(cfg: RunConfig, net: Any = None) -> tuple[int, int]:
    """Trainable dimensions of the LoRA rounds and of the head-only rounds (0
    when the run has none), counted on the real model (``net``: one already
    built for this config, left as it was found)."""
    from fedtune.common.model import (
        build_model,
        set_lora_trainable,
        trainable_parameters,
    )

    if net is None:
        net = build_model(cfg.model, cfg.lora, num_labels=len(cfg.data.labels),
                          seed=cfg.train.seed)
    dims = trainable_parameters(net)
    if not cfg.train.linear_probe_rounds:
        return dims, 0
    set_lora_trainable(net, cfg.lora, trainable=False)
    probe = trainable_parameters(net)
    set_lora_trainable(net, cfg.lora, trainable=True)
    return dims, probe


def plan_sites(cfg: RunConfig, sites: Sequence[tuple[str, int]], *,
               dims: tuple[int, int]) -> list[SitePlan]:
    """A :class:`SitePlan` for each ``(name, training records)``."""
    done: dict[int, SitePlan] = {}  # sites of one size share a plan
    out = []
    for name, n in sites:
        if n not in done:
            done[n] = plan_site(cfg, site=name, records=n, dims=dims[0],
                                probe_dims=dims[1],
                                count=cfg.releases_class_histogram)
        out.append(replace(done[n], site=name))
    return out
