"""Framework overhead: simulation round wall time / the sum of the sites' local
training times in that round (what Flower + fedtune add around training).

    python bench/framework_overhead.py [--quick] [--rounds 4] [--out DIR]

Runs ``simulations/drug-reviews.yaml`` (8 sites, DP on) twice through Flower's
simulation engine:

- **sequential** (``federation.client_cpus=2`` on 2 cores: one site at a time): the
  sum of training times is the least a round can take, so ratio - 1 is the overhead
  (message passing, model build and data load per message, DP setup, aggregation,
  validation, checkpoint);
- **parallel** (the default, ``client_cpus=1``: two sites at once on 2 cores): the
  ratio falls below 1 by the parallelism.

A site's training time is its ``train-seconds`` metric (the local loop, from the
first batch to the validation pass). Round 1 also pays the actors' cold start
(imports, first model load) and is reported apart; the headline is the median of
the later rounds. The central evaluation after each round is reported apart too
(it is not in ``round_seconds``). ``--quick``: 2 rounds of 1 local step of batch 16
at 64 tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from harness import RESULTS, device, simulate, table, write

MODES = {"sequential": ["federation.client_cpus=2"],
         "parallel": ["federation.client_cpus=1"]}
QUICK = ["federation.num_rounds=2", "train.max_steps=1", "train.batch_size=16",
         "data.max_length=64", "data.max_test_samples=100"]


def measure(mode: str, rounds: int, work: Path, extra: list[str]) -> dict[str, Any]:
    rows, wall = simulate(work / mode, [f"federation.num_rounds={rounds}", *extra,
                                        *MODES[mode]])
    per = [{"round": r["round"], "round_s": r["round_seconds"],
            "train_sum_s": r["client_train_seconds_sum"],
            "ratio": r["round_seconds"] / r["client_train_seconds_sum"],
            "eval_s": r["eval_seconds"]} for r in rows]
    later = per[1:] or per
    return {"mode": mode, "overrides": MODES[mode], "process_wall_s": wall,
            "rounds": per, "round1_ratio": per[0]["ratio"],
            "median_ratio_after_round1": statistics.median(p["ratio"] for p in later),
            "median_round_s_after_round1": statistics.median(p["round_s"]
                                                             for p in later),
            "median_overhead_s_after_round1": statistics.median(
                p["round_s"] - p["train_sum_s"] for p in later)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    extra = QUICK if args.quick else []
    rounds = 2 if args.quick else args.rounds
    work = Path(tempfile.mkdtemp(prefix="fedtune-overhead-"))
    results = [measure(m, rounds, work, extra) for m in MODES]
    path = write(args.out, "framework_overhead" + ("-quick" if args.quick else ""), {
        "device": device(), "cores": os.cpu_count(), "task": "drug-reviews.yaml",
        "quick": args.quick, "overrides": extra, "results": results})
    print(table(["mode", "round", "round s", "sum train s", "round / train",
                 "eval s"],
                [[r["mode"], p["round"], p["round_s"], p["train_sum_s"], p["ratio"],
                  p["eval_s"]] for r in results for p in r["rounds"]]))
    for r in results:
        print(f"{r['mode']}: median round / sum of training (rounds 2+) "
              f"{r['median_ratio_after_round1']:.3f}; round 1 {r['round1_ratio']:.3f}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
