"""The default's run-to-run spread under DP, and what each stabiliser does to it.

    python bench/repeats.py [--arms default,server-momentum,...] [--runs 5]
                            [--out DIR]

Each arm runs ``simulations/default.yaml`` (8 label-skewed ICD-10 sites of 1,500
records, epsilon 8) ``--runs`` times, each with fresh DP noise (the data split is
the same), and reports the served model's macro-F1 (the best round with its
calibrated decision bias) as mean and sd, with R = mean / the tuned centralized
non-private macro-F1 of ``privacy_utility.json`` (committed). Arms:

- ``default``: the built-in recipe as shipped (10 rounds; the head starts from
  the label descriptions' embeddings; its head rounds: SGD at 1.0, batch 512,
  sqrt(records) steps per round, 37 at 1,350 records);
- ``zero-head``: the same with the head starting at zero (``model.head_init:
  zero``), the default before the label prior;
- ``sites-150``, ``sites-150-zero-head``: both at 150 records per site (the
  recipe map's smallest row);
- ``twenty-epochs``: the same with 20 epochs per head round (40 steps), the
  default before ``train.recipe: auto`` chose the steps by site size;
- ``five-rounds``: that over 5 rounds (default.yaml before);
- ``adamw-head``: 5 rounds with the head rounds as they were before (AdamW at 0.1
  for 10 epochs): under AdamW a coordinate the noise alone drives moves by ~lr
  each step, under SGD by lr x noise (bench/dp_head_grid.py's ``sgd-small``);
- ``server-momentum``: 5 rounds with FedAvgM (momentum 0.9, server learning rate
  1): the server averages the sites' noisy updates over rounds;
- ``more-steps``: the AdamW head at three times its epochs and a third of its
  learning rate, so each step carries more noise and the steps average it;
- ``sgd-head-lr2``: SGD at 2 for 10 epochs.

The results go to ``OUT/privacy_utility_repeats.json``, rewritten after every
run (a stopped bench keeps what it measured; a rerun carries on).
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

TWENTY = ["train.linear_probe_epochs=20"]  # the head rounds' length before auto's
FIVE = ["federation.num_rounds=5", *TWENTY]  # default.yaml's rounds before
SMALL = ["data.max_samples_per_site=150"]  # the recipe map's smallest row
ARMS: dict[str, list[str]] = {
    "default": [],
    "zero-head": ["model.head_init=zero"],  # the default before the label prior
    "sites-150": SMALL,
    "sites-150-zero-head": [*SMALL, "model.head_init=zero"],
    "twenty-epochs": TWENTY,
    "five-rounds": FIVE,
    "server-momentum": [*FIVE, "federation.strategy=fedavgm",
                        "federation.server_momentum=0.9",
                        "federation.server_learning_rate=1.0"],
    "more-steps": [*FIVE, "train.linear_probe_optimizer=adamw",
                   "train.linear_probe_epochs=30",
                   "train.linear_probe_learning_rate=0.0333"],
    "adamw-head": [*FIVE, "train.linear_probe_optimizer=adamw",
                   "train.linear_probe_learning_rate=0.1",
                   "train.linear_probe_epochs=10"],
    "sgd-head-lr2": [*FIVE, "train.linear_probe_learning_rate=2.0",
                     "train.linear_probe_epochs=10"],
}


def served_f1(rows: list[dict[str, Any]]) -> float:
    """The served model's macro-F1: the calibrated best round, else the last."""
    cal = next((r["calibration"] for r in rows if r.get("calibration")), None)
    if cal and cal.get("eval", {}).get("macro-f1") is not None:
        return float(cal["eval"]["macro-f1"])
    return float(rows[-1]["eval_macro_f1"])


def baseline(folder: Path) -> float | None:
    """The tuned centralized non-private macro-F1 (privacy_utility.json)."""
    path = folder / "privacy_utility.json"
    if not path.is_file():
        return None
    for r in json.loads(path.read_text())["results"]:
        if r["setting"].startswith("centralized non-private"):
            return float(r["macro_f1"])
    return None


def summary(runs: list[dict[str, Any]], base: float | None) -> list[dict[str, Any]]:
    out = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        f1 = [r["macro_f1"] for r in runs if r["arm"] == arm]
        mean = statistics.fmean(f1)
        zero = [r["round0_macro_f1"] for r in runs if r["arm"] == arm
                and r.get("round0_macro_f1") is not None]
        out.append({"arm": arm, "overrides": ARMS.get(arm, []), "n": len(f1),
                    "round0_macro_f1": statistics.fmean(zero) if zero else None,
                    "mean": mean, "sd": statistics.stdev(f1) if len(f1) > 1 else None,
                    "min": min(f1), "max": max(f1),
                    "ratio": mean / base if base else None})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default="default")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--keep", help="keep each run directory here as ARM-RUN (for "
                   "fedtune compare)")
    args = p.parse_args()
    folder = Path(args.out)
    path = folder / "privacy_utility_repeats.json"
    runs: list[dict[str, Any]] = (json.loads(path.read_text())["runs"]
                                  if path.is_file() else [])
    base = baseline(folder) or baseline(RESULTS)
    for arm in args.arms.split(","):
        for i in range(sum(r["arm"] == arm for r in runs), args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                run_dir = (Path(args.keep) / f"{arm}-{i + 1}" if args.keep
                           else Path(tmp) / "run")
                rows, wall = simulate(run_dir, ARMS[arm], scenario=MAIN)
                zero = json.loads((run_dir / "metrics.jsonl").read_text(
                    ).splitlines()[0])  # round 0: before training
            runs.append({"arm": arm, "run": i + 1, "macro_f1": served_f1(rows),
                         "round0_macro_f1": zero.get("eval_macro_f1"),
                         "final_round_macro_f1": rows[-1].get("eval_macro_f1"),
                         "epsilon": rows[-1].get("epsilon_max"), "wall_s": wall})
            print(f"{arm} run {i + 1}: macro-F1 {runs[-1]['macro_f1']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            write(folder, "privacy_utility_repeats", {
                "device": device(), "scenario": str(MAIN),
                "tuned_nonprivate_macro_f1": base, "arms": summary(runs, base),
                "note": "arms as ARMS names them now: runs measured before an arm "
                "was renamed were relabelled to the arm whose overrides they ran",
                "runs": runs})
    rows_out = summary(runs, base)
    print(table(["arm", "n", "mean", "sd", "min", "max", "R"],
                [[r["arm"], r["n"], r["mean"], r["sd"] or "-", r["min"], r["max"],
                  r["ratio"] or "-"] for r in rows_out]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
