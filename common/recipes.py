"""``train.recipe``: which phases a run trains, resolved from the measured map.

- ``head``: every round trains the classification head on cached features;
- ``head+lora``: the first rounds train the head, the last third of the rounds
  the adapter (``lora.method``: LoRA, bias-only, LayerNorm-only or IA3) with the
  head, on the top ``lora.top_layers`` layers (2 when left at 0, the frozen ones
  cached), with ``privacy.linear_probe_budget`` (0.5 when left at 0) of epsilon
  for the head rounds;
- ``lora``: the adapter (+ head) from round 1;
- ``auto`` (the default): the row of the measured map (:data:`MAP`, from
  ``bench/recipe_map.py``, held to its JSON by a test) that is within max(0.01,
  sd) of the best at every measured size, the cheapest first
  (:func:`auto_row`). A causal LM has no head: always ``lora``, the adapter
  every round; under ``auto`` its method and layers (``lora.method``,
  ``lora.top_layers``, where left at their defaults) are the best DP row of the
  instruct scenario's measured map (:data:`SFT_MAP`, from ``bench/sft_map.py``).

The choice is made from the config alone, so every side (the planner, the server,
each site) resolves the same one: a key the recipe sets is taken from the recipe
only while it holds its default value; a key set to anything else wins, and the
plan says so, with what the map predicts the override costs (:func:`overrides`).
Pure: no torch, no Flower.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

RECIPES = ("auto", "head", "head+lora", "lora")
SOURCE = "bench/results/recipe_by_site_size.json"
# what each measured row of the map trains: (train.recipe, lora.method,
# lora.top_layers); head+lora rows train the head for the first two thirds of the
# rounds, then the adapter (+ head) with half of epsilon
ROWS: dict[str, tuple[str, str, int]] = {
    "head": ("head", "lora", 0),
    "head+lora1": ("head+lora", "lora", 1),
    "head+lora2": ("head+lora", "lora", 2),
    "head+bitfit2": ("head+lora", "bitfit", 2),
    "head+layernorm2": ("head+lora", "layernorm", 2),
    "head+ia3-2": ("head+lora", "ia3", 2),
}
# served macro-F1 on ICD-10 at epsilon 8 by records per site, then row: (mean, sd)
# over the runs (fresh DP noise each) of bench/recipe_map.py; a test holds it to
# SOURCE
# (2 runs per cell; bench/recipe_map.py prints this literal; at 5,000 records
# per site only the head and the eps75/eps90 variants were run: an ``@`` variant
# is not a row auto picks, and IA3 eps75's 0.645 there is bench/README 11)
MAP: dict[int, dict[str, tuple[float, float]]] = {
    150: {"head": (0.4279, 0.0061), "head+lora1": (0.375, 0.0087),
          "head+lora2": (0.4093, 0.0073), "head+bitfit2": (0.3799, 0.0014),
          "head+layernorm2": (0.3877, 0.0063), "head+ia3-2": (0.3853, 0.0195)},
    1350: {"head": (0.6141, 0.008), "head+lora1": (0.5408, 0.0033),
           "head+lora2": (0.5602, 0.0301), "head+ia3-2": (0.5637, 0.0156)},
    5000: {"head": (0.6341, 0.0073)},
}
SFT_SOURCE = "bench/results/sft_map.json"
# a causal LM's rows (lora.method, lora.top_layers), cheapest first
SFT_ROWS: dict[str, tuple[str, int]] = {
    "lora-top1": ("lora", 1), "ia3-top1": ("ia3", 1), "lora-top2": ("lora", 2),
    "ia3-top2": ("ia3", 2), "prompt": ("prompt", 0), "prefix": ("prefix", 0)}
# exact match of the instruct scenario (SmolLM2-135M, 8 sites of 1,000 ICD-10
# prompt/answer pairs) at epsilon 8 by row: (mean, sd) over its runs; a test holds
# it to SFT_SOURCE (the full-scale DP rows)
SFT_MAP: dict[str, tuple[float, float]] = {"lora-top1": (0.3313, 0.0092)}
TOP_LAYERS = 2  # head+lora's LoRA layers where lora.top_layers is 0
# DP steps of a head round by a site's records: sqrt(records) within these bounds
HEAD_STEPS = (10, 40)
BATCH = 512  # a classification run's batch (both phases) where train.batch_size is 0
STEPS_SOURCE = "bench/results/head_steps_by_site_size.json"
# its replayed macro-F1 (mean of 5 runs, batch 512) by records per site, then DP
# steps per round: the best count grows with the site, and sqrt(records) (the
# rule's pick: 12, 22, 37, 40) is the best cell at every size
STEPS_MAP: dict[int, dict[int, float]] = {
    150: {10: 0.3322, 12: 0.3333, 20: 0.3009, 25: 0.3035, 40: 0.2679},
    500: {10: 0.4795, 20: 0.5271, 22: 0.5358, 25: 0.5257, 40: 0.4979},
    1350: {10: 0.5252, 20: 0.6169, 25: 0.6234, 37: 0.6242, 40: 0.6228},
    5400: {10: 0.5396, 20: 0.6320, 25: 0.6402, 40: 0.6439, 73: 0.6367},  # 2 sites
}
# batch 128 at the pick's steps against batch 512, by records per site
BATCH_128_COST = {150: 0.0002, 500: 0.0114, 1350: 0.0127, 5400: 0.0260}
PROBE_BUDGET = 0.5  # head+lora's share of epsilon for the head rounds
PRIOR_SOURCE = "bench/results/dp_head_grid-prior.json"
# model.head_init labels: the prior's best scale (the replayed macro-F1 at epsilon
# 8, 10 rounds, mean of 5 noise draws; fedtune.common.priors) by records per site
PRIOR_SCALE_MAP: dict[int, float] = {150: 60.0, 300: 40.0, 500: 10.0, 1350: 5.0}


@dataclass(frozen=True)
class Choice:
    """What a recipe sets, and why."""

    recipe: str  # head | head+lora | lora (auto resolved)
    linear_probe_rounds: int
    top_layers: int
    linear_probe_budget: float
    method: str  # lora.method
    reason: str


def head_steps(num_examples: int) -> int:
    """DP steps per head round at a site of ``num_examples`` training records."""
    low, high = HEAD_STEPS
    return min(high, max(low, round(math.sqrt(max(1, num_examples)))))


def prior_scale(records: float) -> float:
    """The label prior's scale for a federation whose typical site (weighted as
    the average weighs the sites) holds ``records`` training records:
    :data:`PRIOR_SCALE_MAP`, interpolated in log(records), held at its ends."""
    sizes = sorted(PRIOR_SCALE_MAP)
    if records <= sizes[0]:
        return PRIOR_SCALE_MAP[sizes[0]]
    if records >= sizes[-1]:
        return PRIOR_SCALE_MAP[sizes[-1]]
    i = bisect.bisect_right(sizes, records)
    lo, hi = sizes[i - 1], sizes[i]
    t = (math.log(records) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return PRIOR_SCALE_MAP[lo] + t * (PRIOR_SCALE_MAP[hi] - PRIOR_SCALE_MAP[lo])


def head_start(cfg: Any, records: float | None) -> str:
    """The plan's words on where the head starts."""
    init = cfg.model.head_init
    if init != "labels":
        return (f"the head starts at {'zero' if init == 'zero' else 'random'} "
                "(model.head_init): round 0 predicts nothing useful")
    words = ("the label descriptions" if cfg.data.label_descriptions
             else "the label names")
    if cfg.model.head_init_scale:
        scale = f"scale {cfg.model.head_init_scale:g} (model.head_init_scale)"
    elif records:
        scale = (f"scale {prior_scale(records):.3g} for the typical site's "
                 f"{records:,.0f} records ({PRIOR_SOURCE})")
    else:
        scale = "its scale set by the typical site's records"
    return (f"the head starts from the encoder's embeddings of {words}, {scale}: "
            "round 0 already predicts (zero-shot), at no privacy cost")


def _tolerance(row: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """(the best mean of a size's row, how far below it a pick may lie:
    max(0.01, the best's sd))."""
    best = max(row.values(), key=lambda v: v[0])
    return best[0], max(0.01, best[1])


def auto_row() -> str:
    """What ``train.recipe: auto`` trains: the first row (cheapest first, the
    head alone leading) within max(0.01, sd) of the best at every measured size;
    failing one, the row within it at the most sizes."""
    def near(name: str) -> int:
        out = 0
        for row in MAP.values():
            best, slack = _tolerance(row)
            out += name in row and row[name][0] >= best - slack
        return out
    return max(ROWS, key=lambda name: (near(name), -list(ROWS).index(name)))


def row_of(cfg: Any) -> str | None:
    """The map's row a resolved run config trains (None: not a measured row)."""
    done = trained(cfg)
    if done == "head":
        return "head"
    key = ("head+lora" if done == "head+lora" else done, cfg.lora.method,
           cfg.lora.top_layers)
    return next((name for name, what in ROWS.items() if what == key), None)


def _quote_map() -> str:
    """The map in a line: each size's head against its best other row."""
    parts = []
    for size in sorted(MAP):
        row = MAP[size]
        other = max((k for k in row if k != "head"), key=lambda k: row[k][0],
                    default=None)
        head = f"head {row['head'][0]:.3f}" if "head" in row else "head -"
        parts.append(f"{size:,} records/site {head}" + (
            f" against {other} {row[other][0]:.3f}" if other else ""))
    return ", ".join(parts)


def choose(*, recipe: str, task: str, rounds: int, top_layers: int,
           probe_budget: float, method: str = "lora") -> Choice:
    """Resolve ``recipe`` for a run of ``rounds`` rounds."""
    if task != "classification":
        return _causal(recipe, top_layers, probe_budget, method)
    reason = f"train.recipe: {recipe}"
    if recipe == "auto":
        row = auto_row()
        recipe, auto_method, auto_top = ROWS[row]
        if recipe == "head":
            reason = ("train.recipe: auto -> head (every round the head on cached "
                      f"features): the measured map ({SOURCE}, epsilon 8) has it "
                      f"within max(0.01, sd) of the best row at every site size, "
                      f"{_quote_map()}")
        else:
            reason = (f"train.recipe: auto -> {row} (the measured map, {SOURCE}: "
                      f"{_quote_map()})")
            method, top_layers = auto_method, top_layers or auto_top
    if recipe == "head":
        return Choice("head", -1, top_layers, probe_budget, method, reason)
    if recipe == "lora":
        return Choice("lora", 0, top_layers, probe_budget, method, reason)
    lora_rounds = max(1, (rounds + 1) // 3)
    return Choice("head+lora", max(0, rounds - lora_rounds), top_layers or TOP_LAYERS,
                  probe_budget or PROBE_BUDGET, method,
                  f"{reason} ({rounds - lora_rounds} head rounds, then "
                  f"{lora_rounds} of the adapter)")


def sft_auto_row() -> str | None:
    """A causal LM's ``auto`` row: the cheapest (:data:`SFT_ROWS`' order) within
    max(0.01, sd) of the best DP exact match measured (None: no map)."""
    if not SFT_MAP:
        return None
    best, slack = _tolerance(SFT_MAP)
    return next(name for name in SFT_ROWS
                if name in SFT_MAP and SFT_MAP[name][0] >= best - slack)


def _causal(recipe: str, top_layers: int, probe_budget: float, method: str
            ) -> Choice:
    """A causal LM's recipe: the adapter every round; under ``auto``, with
    ``lora.method`` and ``lora.top_layers`` at their defaults, the measured row."""
    reason = "a causal LM has no classification head: the adapter every round"
    row = sft_auto_row()
    if recipe != "auto" or row is None:
        return Choice("lora", 0, top_layers, probe_budget, method, reason)
    if (method, top_layers) not in (("lora", 0), SFT_ROWS[row]):
        return Choice("lora", 0, top_layers, probe_budget, method, reason + (
            f"; lora.method/top_layers set, so not the measured {row}"))
    method, top_layers = SFT_ROWS[row]
    quoted = ", ".join(f"{k} {v[0]:.3f}" for k, v in sorted(
        SFT_MAP.items(), key=lambda kv: -kv[1][0]))
    return Choice("lora", 0, top_layers, probe_budget, method,
                  f"{reason}; train.recipe: auto -> {row} (exact match at epsilon 8 "
                  f"on the instruct scenario, {SFT_SOURCE}: {quoted})")


def resolve(sections: dict[str, Any]) -> tuple[dict[str, Any], Choice]:
    """The sections with the recipe's keys set where they hold their defaults
    (sections: the built config dataclasses by name); and the choice."""
    train, lora, priv = sections["train"], sections["lora"], sections["privacy"]
    choice = choose(recipe=train.recipe, task=sections["model"].task,
                    rounds=sections["federation"].num_rounds,
                    top_layers=lora.top_layers,
                    probe_budget=priv.linear_probe_budget, method=lora.method)
    default_train = type(train)()
    out = dict(sections)
    if train.linear_probe_rounds == default_train.linear_probe_rounds and \
            sections["model"].task == "classification":
        out["train"] = dataclasses.replace(
            train, linear_probe_rounds=choice.linear_probe_rounds)
    if sections["model"].task != "classification" and (
            lora.method, lora.top_layers) != (choice.method, choice.top_layers):
        out["lora"] = dataclasses.replace(lora, method=choice.method,
                                          top_layers=choice.top_layers)
    if choice.recipe == "head+lora":
        if lora.top_layers == type(lora)().top_layers:
            lora = dataclasses.replace(lora, top_layers=choice.top_layers)
        if lora.method == type(lora)().method:
            lora = dataclasses.replace(lora, method=choice.method)
        out["lora"] = lora
        if priv.linear_probe_budget == type(priv)().linear_probe_budget:
            out["privacy"] = dataclasses.replace(
                priv, linear_probe_budget=choice.linear_probe_budget)
    return out, choice


def trained(cfg: Any) -> str:
    """What a resolved run config trains: head, head+lora or lora."""
    probe, rounds = cfg.probe_rounds, cfg.federation.num_rounds
    return "head" if probe >= rounds else ("lora" if probe == 0 else "head+lora")


def overrides(cfg: Any, records_per_site: float | None = None) -> list[str]:
    """Plain words on the resolved recipe: the choice and its reason, then each
    key that overrides it, with what the map predicts it costs at the nearest
    measured size to ``records_per_site``."""
    train = cfg.train
    choice = choose(recipe=train.recipe, task=cfg.model.task,
                    rounds=cfg.federation.num_rounds, top_layers=cfg.lora.top_layers,
                    probe_budget=cfg.privacy.linear_probe_budget,
                    method=cfg.lora.method)
    out = [choice.reason]
    if cfg.model.task != "classification":
        return out
    done = trained(cfg)
    if done != choice.recipe:
        line = (f"train.linear_probe_rounds={train.linear_probe_rounds} overrides "
                f"it: this run trains {done}")
        row, pick = row_of(cfg), auto_row() if train.recipe == "auto" else None
        if records_per_site and MAP and row and pick:
            size = min(MAP, key=lambda n: abs(n - records_per_site))
            measured = MAP[size]
            if row in measured and pick in measured:
                diff = measured[row][0] - measured[pick][0]
                if diff < 0:
                    line += (f", predicted to cost {-diff:.3f} macro-F1 (the map at "
                             f"{size:,} records/site: {row} {measured[row][0]:.3f}, "
                             f"{pick} {measured[pick][0]:.3f})")
        out.append(line)
    return out
