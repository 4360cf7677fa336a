"""Forgetting: does instruction tuning under DP damage general ability?

    python bench/retention.py              # the causal-LM scenario, 4 rounds: ~10 min
    python bench/retention.py --rounds 2   # the scenario as shipped

Runs ``simulations/causal-lm.yaml`` (SmolLM2-135M-Instruct, DP on, 4 drug-review
sites) and reads, per round, the task's held-out perplexity and the perplexity on
the general-text retention set (``fedtune:chitchat-retention``, everyday English
conversations), round 0 being the base model before any training. Writes
``bench/results/retention.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from harness import RESULTS, ROOT, device, simulate, table, write

SCENARIO = ROOT / "simulations" / "causal-lm.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        _, wall = simulate(run_dir, [f"federation.num-rounds={args.rounds}",
                                     *args.overrides], scenario=SCENARIO)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text()
                .splitlines() if x.strip()]
    curve = [{"round": r["round"], "task_perplexity": r.get("eval_perplexity"),
              "retention_perplexity": r.get("retention_perplexity"),
              "epsilon_max": r.get("epsilon_max")} for r in rows]
    base = curve[0]["retention_perplexity"]
    print(f"causal-LM scenario, {args.rounds} rounds, {device()}, {wall / 60:.1f} min")
    print(table(["round", "task perplexity", "retention perplexity", "vs base",
                 "ε max"],
                [[c["round"], c["task_perplexity"], c["retention_perplexity"],
                  f"{c['retention_perplexity'] / base - 1:+.1%}",
                  c["epsilon_max"] if c["epsilon_max"] is not None else "-"]
                 for c in curve]))
    path = write(args.out, "retention", {
        "device": device(), "scenario": str(SCENARIO.relative_to(ROOT)),
        "rounds": args.rounds, "overrides": args.overrides, "wall_s": wall,
        "curve": curve,
        "retention_change": curve[-1]["retention_perplexity"] / base - 1})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
