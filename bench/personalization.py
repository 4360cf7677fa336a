"""Personalisation: the global model against each site's own fine-tuned copy.

    python bench/personalization.py                       # ε 1 and 4: ~6 min
    python bench/personalization.py --epsilons 1 --epochs 5

Runs the main job (``simulations/default.yaml``: 8 label-skewed ICD-10 hospitals,
DP on, ε = 8 for the federation) with ``train.personalize_epochs``: after round 5
every site fine-tunes the best global adapter on its own records under DP-SGD
calibrated to ``privacy.personalize_epsilon`` (charged on top), and scores both
adapters on its own held-out split (10 % of its records). One federation per
epsilon. Writes ``bench/results/personalization.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import MAIN, RESULTS, device, simulate, table, write


def run(epsilon: float, epochs: int, extra: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        rows, wall = simulate(run_dir, [
            f"train.personalize-epochs={epochs}",
            f"privacy.personalize-epsilon={epsilon}", *extra], scenario=MAIN)
        result = json.loads((run_dir / "personalization.json").read_text())
    return {"epsilon": epsilon, "epochs": epochs, "wall_s": wall,
            "global_test_macro_f1": rows[-1]["eval_macro_f1"], **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    args = p.parse_args(argv)
    results = [run(eps, args.epochs, args.overrides) for eps in args.epsilons]
    for res in results:
        print(f"\npersonalisation ε {res['epsilon']:g} ({res['epochs']} epochs) after "
              f"round {res['round']}; the global model's macro-F1 on the central "
              f"test set: {res['global_test_macro_f1']:.3f}")
        body = []
        for s in sorted(res["sites"].values(), key=lambda v: int(v["site"][1:])):
            g, q = s["global"], s["personalised"]
            body.append([s["site"], s["records"], g["macro-f1"], q["macro-f1"],
                         q["macro-f1"] - g["macro-f1"], g["accuracy"],
                         q["accuracy"], s["epsilon"], s["epsilon_run"]])
        m = res["mean"]
        body.append(["mean", "", m["global"]["macro-f1"],
                     m["personalised"]["macro-f1"],
                     m["personalised"]["macro-f1"] - m["global"]["macro-f1"],
                     m["global"]["accuracy"], m["personalised"]["accuracy"], "", ""])
        print(table(["site", "held-out", "macro-F1 global", "personalised", "gain",
                     "acc global", "personalised", "ε pers.", "ε run total"], body))
    path = write(args.out, "personalization", {
        "device": device(), "scenario": "simulations/default.yaml",
        "overrides": args.overrides, "results": results})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
