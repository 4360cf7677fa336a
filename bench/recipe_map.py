"""Which DP recipe wins at which site size: the head alone against the head then an
adapter (LoRA on the top 1 or 2 layers, bias-only, LayerNorm-only, IA3), on
ICD-10 at epsilon 8, under today's head recipe.

    python bench/recipe_map.py [--sizes 150,1350,5000] [--recipes head,...]
                               [--runs 2] [--out DIR]

Each cell is ``--runs`` simulations of ``simulations/default.yaml`` (fresh DP
noise each, the same data split) with ``data.max_samples_per_site`` set to the
size: 8 sites at 150 and 1,350 records, 2 sites at 5,000 (46 k training records
hold 8 x 5,000, but 2 cores do not train 40 k records of an adapter per round in a
bench; fewer sites, same records per site, and the plan's per-site signal is
what the size changes). Recipes (10 rounds each):

- ``head``: the built-in default, every round the head on cached features (SGD,
  the label prior);
- ``head+ADAPTER``: rounds 1-7 the head, rounds 8-10 the head and the adapter
  (``train.recipe: head+lora``), half of epsilon to each phase, the adapter on
  the top layers (``lora.top_layers``; the frozen ones below cached):
  ``lora1``/``lora2`` LoRA (r 8, AdamW 5e-3) on the top 1/2 layers; ``bitfit2``,
  ``layernorm2``, ``ia3-2`` (``lora.method``) on the top 2 layers at AdamW 2e-2
  (vectors: fewer, larger steps);
- variants of an adapter row (``ROW@VARIANT``): ``eps25``/``eps75``/``eps90`` a
  quarter / three quarters / nine tenths of epsilon to the head rounds;
  ``epochs4`` four epochs a round in the adapter's rounds (4x the steps at the
  same batch).

Every adapter round already takes large batches and few steps: batch 512 (the
recipe's, both phases share it since the ledger accounts one sampling rate per
run) is q = 1 at 150 records (a full batch: one step a round), q = 0.38 at 1,350
(3 steps) and q = 0.10 at 5,000 (10 steps).

The figure is the macro-F1 of the model as served: the best round with its
calibrated decision bias (the recipe's last step), on the 2,000 held-out records.
Rows go to ``OUT/recipe_by_site_size.json`` as ``{records_per_site, recipe,
macro_f1_mean, macro_f1_sd, runs, auto}`` (``auto``: the recipe
``train.recipe: auto`` picks at that size), each with its runs' figures; the file
is rewritten after every run, so a stopped bench keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import MAIN, RESULTS, device, simulate, table, write

ADAPT = ["train.recipe=head+lora", "privacy.linear_probe_budget=0.5"]
VECTORS = "train.learning_rate=0.02"
RECIPES: dict[str, list[str]] = {
    "head": [],
    "head+lora1": [*ADAPT, "lora.top_layers=1"],
    "head+lora2": [*ADAPT, "lora.top_layers=2"],
    "head+bitfit2": [*ADAPT, "lora.top_layers=2", "lora.method=bitfit", VECTORS],
    "head+layernorm2": [*ADAPT, "lora.top_layers=2", "lora.method=layernorm",
                        VECTORS],
    "head+ia3-2": [*ADAPT, "lora.top_layers=2", "lora.method=ia3", VECTORS],
}
VARIANTS: dict[str, list[str]] = {
    "epochs4": ["train.local_epochs=4"],
    "eps25": ["privacy.linear_probe_budget=0.25"],
    "eps75": ["privacy.linear_probe_budget=0.75"],
    "eps90": ["privacy.linear_probe_budget=0.9"],
}
SITES = {150: 8, 1350: 8, 5000: 2}


def overrides(recipe: str, size: int) -> list[str]:
    """A row's (or ``ROW@VARIANT``'s) overrides at ``size`` records per site."""
    row, _, variant = recipe.partition("@")
    extra = [o.format(size=size) for o in VARIANTS[variant]] if variant else []
    return [*RECIPES[row], *extra]


def _auto(size: int, sites: int) -> str:
    """The row ``train.recipe: auto`` picks for this federation (its config
    resolved as the run's would be)."""
    from fedtune.common import recipes
    from fedtune.common.config import from_dict

    cfg = from_dict({"data": {"max_samples_per_site": size},
                     "federation": {"num_sites": sites}})
    return {"head": "head", "head+lora": "head+lora2", "lora": "lora"}[
        recipes.trained(cfg)]


def one_run(size: int, recipe: str, work: Path) -> dict[str, Any]:
    sites = SITES.get(size, 8)
    rows, wall = simulate(work, [f"data.max_samples_per_site={size}",
                                 f"federation.num_sites={sites}",
                                 *overrides(recipe, size)], scenario=MAIN)
    last = rows[-1]
    cal = next((r["calibration"] for r in rows if r.get("calibration")), None)
    served = (cal or {}).get("eval", {}).get("macro-f1")
    return {"macro_f1": served if served is not None else last.get("eval_macro_f1"),
            "final_round_macro_f1": last.get("eval_macro_f1"),
            "accuracy": last.get("eval_accuracy"),
            "best_round": last.get("best_round"),
            "epsilon": (cal or {}).get("epsilon_max") or last.get("epsilon_max"),
            "wall_s": wall, "sites": sites}


def cells(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (size, recipe): mean and sd of the final macro-F1 over runs."""
    out = []
    keys = sorted({(r["records_per_site"], r["recipe"]) for r in results},
                  key=lambda k: (k[0], list(RECIPES).index(k[1].split("@")[0])
                                 if k[1].split("@")[0] in RECIPES else 99, k[1]))
    for size, recipe in keys:
        runs = [r for r in results if (r["records_per_site"], r["recipe"]) ==
                (size, recipe)]
        f1 = [r["macro_f1"] for r in runs if r["macro_f1"] is not None]
        out.append({"records_per_site": size, "recipe": recipe,
                    "macro_f1_mean": statistics.fmean(f1) if f1 else None,
                    "macro_f1_sd": statistics.stdev(f1) if len(f1) > 1 else None,
                    "runs": len(f1), "sites": runs[0]["sites"],
                    "auto": _auto(size, runs[0]["sites"]) == recipe,
                    "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs),
                    "per_run": runs})
    for size in {r["records_per_site"] for r in out}:  # the bar for auto
        cell = [r for r in out if r["records_per_site"] == size
                and r["macro_f1_mean"] is not None]
        best = max(cell, key=lambda r: r["macro_f1_mean"])
        for r in cell:
            if r["auto"]:
                r["auto_within_best"] = (best["macro_f1_mean"] - r["macro_f1_mean"]
                                         <= max(0.01, best["macro_f1_sd"] or 0.0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="150,1350,5000")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    path = Path(args.out) / "recipe_by_site_size.json"
    results: list[dict[str, Any]] = []
    if path.is_file():  # carry on from a stopped bench: keep its runs
        results = [r for row in json.loads(path.read_text())["rows"]
                   for r in row["per_run"]]
    for size in (int(s) for s in args.sizes.split(",")):
        for recipe in args.recipes.split(","):
            done = sum(1 for r in results if (r["records_per_site"], r["recipe"]) ==
                       (size, recipe))
            for i in range(done, args.runs):
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    res = one_run(size, recipe, Path(tmp) / "run")
                results.append({"records_per_site": size, "recipe": recipe,
                                "run": i + 1, **res})
                print(f"{size} records/site, {recipe}, run {i + 1}: macro-F1 "
                      f"{res['macro_f1']:.4f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
                write(args.out, "recipe_by_site_size", {
                    "device": device(), "scenario": str(MAIN), "epsilon": 8.0,
                    "recipes": RECIPES, "sites": SITES, "rows": cells(results)})
    rows = cells(results)
    write(args.out, "recipe_by_site_size", {
        "device": device(), "scenario": str(MAIN), "epsilon": 8.0,
        "recipes": RECIPES, "sites": SITES, "rows": rows})
    print(table(["records/site", "sites", "recipe", "macro-F1 mean", "sd", "runs",
                 "auto", "wall s"],
                [[r["records_per_site"], r["sites"], r["recipe"], r["macro_f1_mean"],
                  r["macro_f1_sd"] or "-", r["runs"], r["auto"], r["wall_s_mean"]]
                 for r in rows]))
    print(f"-> {path}")
    print("fedtune.common.recipes.MAP (the rows with >= 2 runs):")
    print(map_literal(rows))


def map_literal(rows: list[dict[str, Any]]) -> str:
    """The measured rows as ``recipes.MAP``'s literal: {size: {row: (mean, sd)}},
    rounded as tests/common/test_recipes.py holds the two to each other."""
    table: dict[int, dict[str, tuple[float, float]]] = {}
    for r in rows:
        if r["recipe"] in RECIPES and r["runs"] >= 2:
            table.setdefault(r["records_per_site"], {})[r["recipe"]] = (
                round(r["macro_f1_mean"], 4), round(r["macro_f1_sd"], 4))
    return "{\n" + "".join(f"    {size}: {row},\n" for size, row in
                           sorted(table.items())) + "}"


if __name__ == "__main__":
    main()
