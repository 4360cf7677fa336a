"""The privacy-utility plan as text (``fedtune plan``, the server's log before
round 1): one row per site, or above :data:`SUMMARY_AT` sites the sites grouped by
verdict. The figures are :mod:`fedtune.common.planning`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from fedtune.common import adapters, planning, recipes
from fedtune.common.config import RunConfig
from fedtune.common.planning import (
    THRESHOLDS,
    VERDICTS,
    SitePlan,
    aggregate_rho,
    head_length,
    noise_to_clip,
    overall,
)

SUMMARY_AT = 20  # more sites than this: the plan groups them by verdict


def _row(p: SitePlan, *, probe: int, rounds: int) -> str:
    """One site's row of the plan table."""
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
    return (f"{p.site:<22} {p.records:>8} {p.share:>6.1%} {p.sample_rate:>7.4f} "
            f"{steps:>5} {sigma:>7} {dims:>7} {nc:>8.3f} {p.rho:>7.3f}  {p.verdict}")


def _grouped(plans: Sequence[SitePlan], row: Callable[[SitePlan], str]) -> list[str]:
    """The sites by verdict: each group's count, share and record range, its worst
    and median site (by rho), and the worst site's advice once."""
    lines = [f"{len(plans):,} sites, grouped by verdict (every site's row: "
             "RUN_DIR/plan.json, or `fedtune plan --all`)"]
    for verdict in VERDICTS:
        group = sorted((p for p in plans if p.verdict == verdict),
                       key=lambda p: p.rho)
        if not group:
            continue
        sizes = sorted(p.records for p in group)
        share = f"{sum(p.share for p in group):.1%} of the aggregate"
        lines.append(f"{verdict}: 1 site, {share}:" if len(group) == 1 else
                     f"{verdict}: {len(group):,} sites, {share}, " + (
                         f"{sizes[0]:,} records each" if sizes[0] == sizes[-1] else
                         f"{sizes[0]:,}-{sizes[-1]:,} records (median "
                         f"{sizes[len(sizes) // 2]:,})")
                     + "; the worst, then the median:")
        worst, median = group[-1], group[len(group) // 2]
        lines += [row(worst)] + ([row(median)] if median is not worst else [])
        if worst.advice:
            lines.append(f"{'':<22} -> {worst.advice}")
    return lines


def _federation(plans: Sequence[SitePlan], cfg: RunConfig) -> list[str]:
    """The aggregate's rho, and under distributed noise what is promised."""
    rho = aggregate_rho(plans, cfg)
    if cfg.privacy.noise != "distributed":
        return [f"federation: the aggregate's rho {rho:.3f} (sqrt of the sum of "
                f"(share x rho)^2 over the sites, weighting "
                f"{cfg.federation.weighting!r})"]
    n, t = cfg.federation.train_nodes, cfg.privacy.max_dropped_or_colluding
    local = math.sqrt(sum((p.share * p.rho) ** 2 for p in plans))
    return [
        f"federation: distributed noise: each round is one full-batch DP step "
        f"whose noise the {n} sites share under SecAgg+ (each adds 1/{n - t} of "
        f"its variance); the aggregate's rho {rho:.4f}, {local / rho:.2f}x less "
        f"than the same steps with local noise ({local:.4f})",
        f"federation: promised: each site's epsilon above, against an honest-but-"
        f"curious server and up to t={t} sites that drop out or collude with it "
        f"(a sum is unmasked only with >= {cfg.federation.secagg_threshold} sites' "
        "shares), under SecAgg+'s own assumptions; not promised: a server that "
        f"deviates from the protocol, or more than {t} colluding sites (they could "
        "subtract their shares, leaving less noise than planned)",
        *([f"federation: REFUSED before round 1: {problem}"]
          if (problem := planning.grid_problem(plans, cfg)) else [])]


def format_plan(plans: Sequence[SitePlan], cfg: RunConfig, *,
                full: bool = False) -> str:
    """The planner's table (grouped by verdict above :data:`SUMMARY_AT` sites,
    unless ``full``), the sites that learn nothing on their own, and the
    federation's verdict, in plain words."""
    priv = cfg.privacy
    head = (f"privacy plan: epsilon {priv.target_epsilon:g} at delta "
            f"{priv.target_delta:g} per site over {cfg.federation.num_rounds} rounds"
            if priv.enabled else "privacy plan: DP is OFF (no noise, no guarantee)")
    rounds = cfg.federation.num_rounds
    probe = cfg.probe_rounds
    header = (f"{'site':<22} {'records':>8} {'share':>6} {'q':>7} {'steps':>5} "
              f"{'sigma':>7} {'dims':>7} {'noise/C':>8} {'rho':>7}  verdict")
    if len(plans) > SUMMARY_AT and not full:
        grouped = _grouped(plans, lambda p: _row(p, probe=probe, rounds=rounds))
        lines = [head, grouped[0], header, *grouped[1:]]
    else:
        lines = [head, header]
        for p in plans:
            lines.append(_row(p, probe=probe, rounds=rounds))
            if p.advice:
                lines.append(f"{'':<22} -> {p.advice}")
    t = THRESHOLDS[cfg.model.task]
    phases = ("" if not probe else
              "; every round trains the head only (LoRA frozen)" if probe == rounds
              else f"; a/b: head-only rounds 1-{probe} / LoRA rounds (noise/C: the "
              "LoRA rounds')")
    lines.append(f"rho = sigma*sqrt(dims)/(batch*sqrt(steps)): <= {t.learns:g} "
                 f"expected to learn, <= {t.marginal:g} marginal, above: the noise "
                 f"drowns the signal{phases}")
    lines.append(f"thresholds for {cfg.model.task}, measured on {t.measured_on}")
    median = sorted(p.records for p in plans)[len(plans) // 2] if plans else None
    lines += [f"recipe: {line}" for line in recipes.overrides(cfg, median)]
    if not cfg.classifies and plans:  # the method and dimensions the noise is for
        lines.append(f"recipe: trains {adapters.describe(cfg)}: {plans[0].dims:,} "
                     "trainable dimensions, the dims above")
    if cfg.probe_rounds:
        lines.append(f"recipe: {head_length(cfg, median)}")
    if cfg.classifies:
        typical = planning.typical_site([p.records for p in plans],
                                        cfg.federation.weighting)
        lines.append(f"recipe: {recipes.head_start(cfg, typical)}")
    if priv.enabled and plans:
        alone = [p for p in plans if p.verdict == VERDICTS[2]]
        if alone and len(alone) < len(plans):
            lines.append(f"on their own, {len(alone)} of {len(plans)} sites will "
                         "learn nothing (" + ", ".join(
                             f"{p.site}: {p.records} records, {p.share:.1%} of the "
                             "aggregate" for p in alone[:5])
                         + (", ..." if len(alone) > 5 else "")
                         + "); the aggregate weighs them by their share")
        lines += _federation(plans, cfg)
    lines.append(f"overall: {overall(plans, cfg)}")
    return "\n".join(lines)
