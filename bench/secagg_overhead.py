"""SecAgg+ round time / plain FedAvg round time, on the default task, same seeds.

    python bench/secagg_overhead.py [--rounds 2] [--out bench/results]

Runs ``simulations/drug-reviews.yaml`` (8 sites, DP on) twice through Flower's
simulation engine: once with ``federation.secure_aggregation=true`` (SecAgg+, 4
ClientApp calls per site per round: setup, key sharing, masked update, unmasking)
and once plain. Reports per-round wall time from each run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(rounds: int, secure: bool, work: Path) -> dict:
    run_dir = work / ("secagg" if secure else "plain")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedtune.simulations.cli", "simulate",
                    str(ROOT / "simulations" / "drug-reviews.yaml"),
                    f"federation.num_rounds={rounds}",
                    f"federation.secure_aggregation={str(secure).lower()}",
                    "federation.secagg_threshold=6", "--run-dir", str(run_dir)],
                   check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in
            (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["round"] > 0]
    return {"secure_aggregation": secure, "wall_s": wall,
            "round_s": [r["round_seconds"] for r in rows],
            "median_round_s": statistics.median(r["round_seconds"] for r in rows),
            "final_eval_loss": rows[-1]["eval_loss"],
            "final_eval_accuracy": rows[-1]["eval_accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedtune-secagg-"))
    plain, secure = run(args.rounds, False, work), run(args.rounds, True, work)
    result = {"device": f"cpu ({os.cpu_count()} cores)", "task": "drug-reviews.yaml",
              "plain": plain, "secagg": secure,
              "ratio_median_round": secure["median_round_s"] / plain["median_round_s"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "secagg_overhead.json").write_text(json.dumps(result, indent=2))
    print(f"{'':>8} | {'rounds (s)':>20} | {'median':>7} | {'eval loss':>9}")
    for name, r in (("plain", plain), ("SecAgg+", secure)):
        rounds = ", ".join(f"{x:.1f}" for x in r["round_s"])
        print(f"{name:>8} | {rounds:>20} | {r['median_round_s']:>7.1f} | "
              f"{r['final_eval_loss']:>9.4f}")
    print(f"SecAgg+ / plain median round time: {result['ratio_median_round']:.2f}")


if __name__ == "__main__":
    main()
