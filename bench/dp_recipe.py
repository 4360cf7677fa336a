"""Ablation of the DP recipe on the default task: which option moves macro-F1.

    python bench/dp_recipe.py [--only NAME[,NAME...]] [--out DIR]

Runs ``simulations/default.yaml`` (8 label-skewed ICD-10 hospitals, DP-SGD at
epsilon 8 per site) once as shipped and once per variant that removes or changes
one piece of the recipe, with the same data split and seed (the DP noise itself is
drawn from the OS's entropy, so a difference of a point or two is within noise).
Each row: final macro-F1 and accuracy, classes with F1 0, the round noise ratio and
the wall time.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import MAIN, RESULTS, device, simulate, table, write

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("the shipped recipe", []),
    "no-logit-adjustment": ("without the logit adjustment (tau 0)",
                            ["train.logit_adjustment=0"]),
    "random-head": ("random instead of zero head", ["model.head_init=random"]),
    "small-batch": ("expected batch 128 instead of 512", ["train.batch_size=128"]),
    "uniform-weights": ("sites weighted uniformly, not by records",
                        ["federation.weighting=uniform"]),
    "fedavgm": ("server momentum 0.9 (FedAvgM, server lr 1)",
                ["federation.strategy=fedavgm", "federation.server_learning_rate=1.0"]),
    "class-weights": ("+ sqrt class weights after clipping",
                      ["train.class_weighting=sqrt"]),
    "lp-ft": ("LP-FT: 4 head-only rounds, then 1 round of LoRA + head (1 epoch) "
              "with half the budget", ["train.linear_probe_rounds=4",
                                       "privacy.linear_probe_budget=0.5"]),
    "lora-every-round": ("LoRA + head in every round (no head-only rounds), "
                         "2 rounds of 1 epoch: about the default's wall time",
                         ["train.linear_probe_rounds=0", "federation.num_rounds=2"]),
    "no-recipe": ("the old default recipe: LoRA + random head every round, batch "
                  "64, lr 1e-2, no logit adjustment; 1 round of 1 epoch",
                  ["train.linear_probe_rounds=0", "federation.num_rounds=1",
                   "train.logit_adjustment=0", "model.head_init=random",
                   "train.batch_size=64", "train.learning_rate=1e-2"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated variant names")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="fedtune-dp-recipe-"))
    results = []
    for name in names:
        what, overrides = VARIANTS[name]
        rows, wall = simulate(work / name, overrides, scenario=MAIN)
        last = rows[-1]
        f1 = {k: v for k, v in last.items() if k.startswith("eval_f1_")}
        results.append({"variant": name, "what": what, "overrides": overrides,
                        "macro_f1": last["eval_macro_f1"],
                        "accuracy": last["eval_accuracy"],
                        "classes_f1_zero": sum(1 for v in f1.values() if v == 0),
                        "epsilon_max": last.get("epsilon_max"),
                        "rho_max": last.get("rho_max"), "wall_s": wall,
                        "macro_f1_by_round": [r["eval_macro_f1"] for r in rows]})
        print(f"{name}: macro-F1 {last['eval_macro_f1']:.3f} ({wall:.0f} s)",
              flush=True)
    path = write(args.out, "dp_recipe", {"device": device(),
                                         "task": "simulations/default.yaml",
                                         "results": results})
    print(table(["variant", "macro-F1", "acc", "F1=0 classes", "eps", "rho max",
                 "wall s"],
                [[r["variant"], r["macro_f1"], r["accuracy"], r["classes_f1_zero"],
                  r["epsilon_max"], r["rho_max"], r["wall_s"]] for r in results]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
