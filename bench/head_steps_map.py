"""How long a DP head round should be at each site size: the map behind
``train.recipe: auto``'s batch and steps (``fedtune.common.recipes.head_steps``).

    python bench/head_steps_map.py [--runs 5] [--out DIR]

The head rounds of ``simulations/default.yaml`` (10 rounds, SGD at 1.0 on cached
MiniLM features, epsilon 8 over the run with the class histogram) replayed by
``bench/dp_head_grid.py``'s plain-torch federation, which takes seconds where a
``fedtune simulate`` takes minutes, so each cell holds ``--runs`` noise draws:

- 8 sites at 150 and 500 records (each site's first records) and at all 1,350;
- 2 sites of 5,400 (the 8 sites' records pooled in pairs of four), the size
  above which the 46 k-record ICD-10 split cannot go with more than one site.

Cells: batch 512 (capped at a site's records, as the sampling rate is) at 10, 20,
25, 40 and sqrt(records) steps per round (and sqrt(records) where the
rule's bound of 40 cuts it), and batch 128 at the rule's steps.
Rows go to ``OUT/head_steps_by_site_size.json`` as ``{records_per_site, sites,
batch, steps_per_round, epochs, macro_f1_mean, macro_f1_sd, runs, auto}``
(``auto``: the cell the rule picks), and the run fails if a pick lies further
than max(0.01, the best cell's sd) below the best cell's mean.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any

import torch
from dp_head_grid import DEFAULTS, features, replay
from harness import RESULTS, device, table, write

from fedtune.common import recipes

RECIPE = {"opt": "sgd", "lr": 1.0, "rounds": 10}  # the shipped head rounds
STEPS = (10, 20, 25, 40)


def federations(sites: list[tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The federations by records per site."""
    out = {size: [(x[:size], y[:size]) for x, y in sites] for size in (150, 500)}
    out[min(len(y) for _, y in sites)] = sites
    half = len(sites) // 2
    pooled = [(torch.cat([x for x, _ in part]), torch.cat([y for _, y in part]))
              for part in (sites[:half], sites[half:])]
    out[min(len(y) for _, y in pooled)] = pooled
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    sites, test, cfg, _ = features()
    k = len(cfg.data.labels)
    rows: list[dict[str, Any]] = []
    for fed in federations(sites).values():
        n = min(len(y) for _, y in fed)
        rule = recipes.head_steps(n)
        uncapped = round(math.sqrt(n))  # where the rule's bound cuts it
        cells = sorted({(512, s) for s in (*STEPS, rule, uncapped)}) + [(128, rule)]
        size_rows = []
        for batch, steps in cells:
            t0 = time.perf_counter()
            point = {**DEFAULTS, **RECIPE, "batch": batch, "steps": steps}
            finals = [replay(fed, test, point, k=k, seed=seed)[-1]
                      for seed in range(args.runs)]
            q = min(1.0, batch / n)
            size_rows.append({
                "records_per_site": n, "sites": len(fed), "batch": batch,
                "steps_per_round": steps, "epochs": round(steps * q, 2),
                "macro_f1_mean": statistics.fmean(finals),
                "macro_f1_sd": statistics.stdev(finals), "runs": len(finals),
                "macro_f1_runs": finals,
                "auto": (batch, steps) == (512, rule)})
            print(f"{n} records x {len(fed)} sites, batch {batch}, {steps} steps: "
                  f"{size_rows[-1]['macro_f1_mean']:.3f} "
                  f"sd {size_rows[-1]['macro_f1_sd']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        rows += size_rows
    path = write(args.out, "head_steps_by_site_size", {
        "device": device(), "task": "simulations/default.yaml's head rounds "
        "(10 rounds, SGD 1.0, epsilon 8) replayed on cached features",
        "rule": f"batch 512, sqrt(records) DP steps per round within "
        f"{recipes.HEAD_STEPS}", "rows": rows})
    print(table(["records/site", "sites", "batch", "steps", "epochs", "macro-F1",
                 "sd", "auto"],
                [[r["records_per_site"], r["sites"], r["batch"],
                  r["steps_per_round"], r["epochs"], r["macro_f1_mean"],
                  r["macro_f1_sd"], "auto" if r["auto"] else ""] for r in rows]))
    print(f"-> {path}")
    failed = []
    for n in sorted({r["records_per_site"] for r in rows}):
        cell = [r for r in rows if r["records_per_site"] == n]
        best = max(cell, key=lambda r: r["macro_f1_mean"])
        pick = next(r for r in cell if r["auto"])
        slack = max(0.01, best["macro_f1_sd"])
        if pick["macro_f1_mean"] < best["macro_f1_mean"] - slack:
            failed.append(f"{n} records/site: the pick {pick['macro_f1_mean']:.3f} "
                          f"lies more than {slack:.3f} below the best "
                          f"{best['macro_f1_mean']:.3f}")
    if failed:
        sys.exit("\n".join(failed))
    print("every pick lies within max(0.01, the best cell's sd) of the best")


if __name__ == "__main__":
    main()
