"""Pooled noise: local DP-SGD noise against distributed noise under SecAgg+, on
the ICD-10 default at 1,350 records per site, 8 sites, epsilon 8.

    python bench/pooled_noise.py [--cells local:head,distributed:head] [--runs 2]
                                 [--out DIR]

Each cell is ``--runs`` simulations of ``simulations/default.yaml`` (fresh DP
noise each, the same split: 8 sites of 1,350 training records). Cells
(``NOISE:RECIPE``, :data:`CELLS`):

- ``local:head``: today's recipe, each site's DP-SGD noise its own (10 rounds);
- ``local:ia3``: the map's best adaptation row at 1,350, ``head+ia3-2@eps75``
  (7 head rounds then 3 with IA3 on the top 2 layers, 3/4 of epsilon to the head);
- ``local+secagg:head``: today's recipe under plain SecAgg+ (threshold 7): the
  round time of secure aggregation without pooled noise;
- ``distributed:head``: ``privacy.noise: distributed``, SecAgg+ (threshold 7,
  t = 1): one full-batch DP step a round, the server's Adam on the pooled sum;
- ``distributed:ia3``: the same, the head's rounds then IA3's on the top 2
  layers, 3/4 of epsilon to the head.

The figures: the served macro-F1 (the best round with its calibrated decision
bias, on the 2,000 held-out records), and the plan's aggregate rho (the
aggregate's noise over its signal per step, ``plan.json``). Rows go to
``OUT/pooled_noise.json`` as ``{noise, recipe, records_per_site, sites,
macro_f1_mean, macro_f1_sd, runs, aggregate_rho}`` with each run's figures,
rewritten after every run (a stopped bench keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from harness import MAIN, RESULTS, device, simulate, table, write

SITES, RECORDS = 8, 1350
IA3 = ["train.recipe=head+lora", "lora.top_layers=2", "lora.method=ia3",
       "train.learning_rate=0.02", "privacy.linear_probe_budget=0.75"]
POOLED = ["privacy.noise=distributed", "federation.secure_aggregation=true",
          "privacy.max_dropped_or_colluding=1", "federation.secagg_threshold=7",
          "federation.secagg_clipping_range=1024"]
CELLS: dict[str, list[str]] = {
    "local:head": [],
    "local:ia3": IA3,
    "local+secagg:head": ["federation.secure_aggregation=true",
                          "federation.secagg_threshold=7"],
    "distributed:head": [*POOLED, "federation.num_rounds=30",
                         "federation.server_learning_rate=0.1"],
    "distributed:ia3": [*POOLED, *IA3, "federation.num_rounds=30",
                        "train.linear_probe_rounds=24",
                        "federation.server_learning_rate=0.1"],
}


def one_run(cell: str, work: Path) -> dict[str, Any]:
    rows, wall = simulate(work, [f"data.max_samples_per_site={RECORDS / 0.9:.0f}",
                                 f"federation.num_sites={SITES}", *CELLS[cell]],
                          scenario=MAIN)
    last = rows[-1]
    cal = next((r["calibration"] for r in rows if r.get("calibration")), None)
    served = (cal or {}).get("eval", {}).get("macro-f1")
    plan = json.loads((work / "plan.json").read_text())
    seconds = [r["round_seconds"] for r in rows if r.get("round_seconds")]
    return {"macro_f1": served if served is not None else last.get("eval_macro_f1"),
            "final_round_macro_f1": last.get("eval_macro_f1"),
            "best_round": last.get("best_round"),
            "epsilon": (cal or {}).get("epsilon_max") or last.get("epsilon_max"),
            "aggregate_rho": plan.get("aggregate_rho"),
            "records_per_site": plan["sites"][0]["records"],
            "rounds": len(seconds),
            "round_seconds_median": statistics.median(seconds) if seconds else None,
            "wall_s": wall}


def cells(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for cell in [c for c in CELLS if any(r["cell"] == c for r in results)]:
        runs = [r for r in results if r["cell"] == cell]
        f1 = [r["macro_f1"] for r in runs]
        noise, recipe = cell.split(":")
        out.append({"noise": noise.split("+")[0], "recipe": recipe,
                    "secagg": "secagg" in noise or noise == "distributed",
                    "records_per_site": runs[0]["records_per_site"], "sites": SITES,
                    "macro_f1_mean": statistics.fmean(f1),
                    "macro_f1_sd": statistics.stdev(f1) if len(f1) > 1 else None,
                    "runs": len(f1), "aggregate_rho": runs[0]["aggregate_rho"],
                    "rounds": runs[0]["rounds"],
                    "round_seconds_median": statistics.fmean(
                        r["round_seconds_median"] for r in runs),
                    "per_run": runs})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="local:head,distributed:head")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    path = Path(args.out) / "pooled_noise.json"
    results: list[dict[str, Any]] = []
    if path.is_file():
        results = [r for row in json.loads(path.read_text())["rows"]
                   for r in row["per_run"]]
    for cell in args.cells.split(","):
        done = sum(1 for r in results if r["cell"] == cell)
        for i in range(done, args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                res = one_run(cell, Path(tmp) / "run")
            results.append({"cell": cell, "run": i + 1, **res})
            print(f"{cell} run {i + 1}: served macro-F1 {res['macro_f1']:.3f}, "
                  f"aggregate rho {res['aggregate_rho']:.4f} "
                  f"({res['wall_s']:.0f} s)", flush=True)
            write(args.out, "pooled_noise", {"device": device(), "cells": CELLS,
                                             "rows": cells(results)})
    rows = cells(results)
    print(table(["noise", "SecAgg+", "recipe", "macro-F1", "sd", "runs",
                 "aggregate rho", "round s"],
                [[r["noise"], r["secagg"], r["recipe"], r["macro_f1_mean"],
                  r["macro_f1_sd"] or "-", r["runs"], r["aggregate_rho"],
                  r["round_seconds_median"]] for r in rows]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
