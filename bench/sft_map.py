"""Which PEFT method a causal LM should train under DP: the instruct scenario
(``simulations/instruct.yaml``) by method, at epsilon 8 and without DP.

    python bench/sft_map.py [--methods lora-top1,ia3-top1] [--runs 3]
                            [--nodp-runs 1] [--out DIR] [-- OVERRIDE ...]

Each cell is ``--runs`` (DP) or ``--nodp-runs`` (no DP) simulations of
``fedtune simulate instruct`` (8 sites of 1,000 ICD-10 prompt/answer pairs,
Dirichlet 1.0 over the chapter; 500 held-out prompts of unseen categories), fresh
DP noise each. Methods (``METHODS``; ``NAME@small`` runs a method at the reduced
scale ``SMALL``: 4 sites of 250, 3 rounds of 7 steps of batch 32, 200 held-out
prompts, for the methods 2 cores cannot run at full scale):

- ``lora-top1`` / ``lora-top2``: LoRA r 8 on q/v of the top 1 / 2 layers, the
  frozen layers below cached (the scenario's default);
- ``ia3-top1`` / ``ia3-top2``: IA3 on the top 1 / 2 layers, cached likewise
  (AdamW 2e-2; ``ia3-top1-lr2``: 2e-1, ten times larger steps for vectors that
  start at 1);
- ``prompt``: prompt tuning, 8 virtual tokens; ``prefix``: prefix tuning, 8
  virtual tokens. Both reach every layer: no cache, the whole model each step.

The figure is exact match on the held-out prompts (greedy answers): the final
round's, and the best round's; round 0 (zero-shot) beside it. Rows go to
``OUT/sft_map.json`` as ``{method, dp, exact_match_mean, exact_match_sd, runs,
sites, records_per_site}`` with each run's figures; the file is rewritten after
every run, and a stopped bench carries on from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from harness import MAIN, RESULTS, device, simulate, table, write

INSTRUCT = MAIN.parent / "instruct.yaml"
METHODS: dict[str, list[str]] = {
    "lora-top1": ["lora.method=lora", "lora.top_layers=1"],
    "lora-top2": ["lora.method=lora", "lora.top_layers=2"],
    "ia3-top1": ["lora.method=ia3", "lora.top_layers=1", "train.learning_rate=0.02"],
    "ia3-top1-lr2": ["lora.method=ia3", "lora.top_layers=1",
                     "train.learning_rate=0.2"],
    "ia3-top2": ["lora.method=ia3", "lora.top_layers=2", "train.learning_rate=0.02"],
    "prompt": ["lora.method=prompt", "lora.top_layers=0", "train.learning_rate=0.02"],
    "prefix": ["lora.method=prefix", "lora.top_layers=0", "train.learning_rate=0.02"],
}
FULL = {"sites": 8, "records_per_site": 1000}
SMALL_SHAPE = {"sites": 4, "records_per_site": 250}
SMALL = [f"federation.num_sites={SMALL_SHAPE['sites']}",
         f"data.max_samples_per_site={SMALL_SHAPE['records_per_site']}",
         "federation.num_rounds=3", "train.batch_size=32", "train.local_epochs=1",
         "data.max_test_samples=200", "data.max_answer_samples=200"]


def overrides(name: str, dp: bool) -> list[str]:
    method, _, scale = name.partition("@")
    out = [*METHODS[method], *(SMALL if scale == "small" else [])]
    return out if dp else [*out, "privacy.enabled=false"]


def one_run(name: str, dp: bool, extra: list[str], work: Path) -> dict[str, Any]:
    _, wall = simulate(work, [*overrides(name, dp), *extra], scenario=INSTRUCT)
    return summary(name, work, wall)


def summary(name: str, work: Path, wall: float) -> dict[str, Any]:
    """A finished run's figures (``work``: its run directory)."""
    lines = (work / "metrics.jsonl").read_text().splitlines()
    zero, rows = json.loads(lines[0]), [json.loads(x) for x in lines[1:] if x.strip()]
    trained = [r for r in rows if r.get("eval_answer_exact") is not None]
    last = trained[-1]
    shape = SMALL_SHAPE if name.endswith("@small") else FULL
    return {"exact_match": last["eval_answer_exact"],
            "best_round_exact_match": max(r["eval_answer_exact"] for r in trained),
            "exact_by_round": [zero.get("eval_answer_exact")]
            + [r["eval_answer_exact"] for r in trained],
            "perplexity_by_round": [zero.get("eval_perplexity")]
            + [r.get("eval_perplexity") for r in trained],
            "zero_shot_exact_match": zero.get("eval_answer_exact"),
            "epsilon": last.get("epsilon_max"), "wall_s": wall,
            **shape}


def cells(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name, dp in sorted({(r["method"], r["dp"]) for r in results},
                           key=lambda k: (k[0], not k[1])):
        runs = [r for r in results if (r["method"], r["dp"]) == (name, dp)]
        em = [r["exact_match"] for r in runs]
        out.append({"method": name, "dp": dp,
                    "exact_match_mean": statistics.fmean(em),
                    "exact_match_sd": statistics.stdev(em) if len(em) > 1 else None,
                    "runs": len(em), "sites": runs[0]["sites"],
                    "records_per_site": runs[0]["records_per_site"],
                    "zero_shot_exact_match": runs[0]["zero_shot_exact_match"],
                    "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs),
                    "per_run": runs})
    for row in out:  # the ratio: DP over the same method without DP
        nodp = next((r for r in out if r["method"] == row["method"]
                     and not r["dp"]), None)
        if row["dp"] and nodp and nodp["exact_match_mean"]:
            row["ratio_to_nodp"] = row["exact_match_mean"] / nodp["exact_match_mean"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="lora-top1")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--nodp-runs", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("extra", nargs="*", help="overrides for every run")
    args = p.parse_args()
    path = Path(args.out) / "sft_map.json"
    results: list[dict[str, Any]] = []
    if path.is_file():
        results = [r for row in json.loads(path.read_text())["rows"]
                   for r in row["per_run"]]
    for name in args.methods.split(","):
        for dp, runs in ((False, args.nodp_runs), (True, args.runs)):
            done = sum(1 for r in results if (r["method"], r["dp"]) == (name, dp))
            for i in range(done, runs):
                with tempfile.TemporaryDirectory() as tmp:
                    res = one_run(name, dp, args.extra, Path(tmp) / "run")
                results.append({"method": name, "dp": dp, "run": i + 1, **res})
                print(f"{name} {'DP' if dp else 'no DP'} run {i + 1}: exact "
                      f"{res['exact_match']:.3f} by round {res['exact_by_round']} "
                      f"({res['wall_s']:.0f} s)", flush=True)
                write(args.out, "sft_map", {"device": device(),
                                            "scenario": str(INSTRUCT), "epsilon": 8.0,
                                            "methods": METHODS, "small": SMALL,
                                            "rows": cells(results)})
    rows = cells(results)
    print(table(["method", "DP", "exact mean", "sd", "runs", "sites x records",
                 "DP / no DP", "wall s"],
                [[r["method"], r["dp"], r["exact_match_mean"],
                  r["exact_match_sd"] or "-", r["runs"],
                  f"{r['sites']} x {r['records_per_site']}",
                  r.get("ratio_to_nodp", "-"), r["wall_s_mean"]] for r in rows]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
