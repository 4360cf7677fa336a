"""Calibrated decisions against the logit adjustment's two ends, under DP.

    python bench/calibration.py [--scenario minimal-icd10,imbalanced] [--runs 3]
                                [--arms recipe,train-tau0] [--out DIR]

Scenarios: ``minimal-icd10`` is a YAML naming only the data and the sites (the
shipped ICD-10 data, its columns and 21 labels, Dirichlet 1.0, 8 sites of 1,500
records: what a new user writes), everything else fedtune's built-in defaults;
``imbalanced`` is ``simulations/imbalanced.yaml`` (circumstance against disease,
12 % minority, 10 unequal label-skewed sites), ``imbalanced-musculoskeletal`` its
harder sibling (musculoskeletal against the rest, 13 % minority, 10 sites share
10,000 records at Dirichlet 0.3, 10 rounds; decisions at tau 1 can overshoot);
any other name is ``simulations/NAME.yaml``.

Arms: ``recipe`` is the built-in default (logit adjustment tau 1 in training, then
the decision calibration on the sites' validation counts under DP). Its run also
scores, on the held-out set and for the record only, the calibration's two
candidate ends: strength 0 (decisions at tau 1, "balanced") and strength 1
(decisions at tau 0, the training prior put back). ``train-tau0`` trains without
the logit adjustment at all (``train.logit_adjustment=0``, no calibration).

Each run draws fresh DP noise (``privacy.secure_noise``); the data split is the
same. Per run: per-class precision, recall and F1 of each decision rule,
macro-F1, accuracy, epsilon, the calibration's choice, the plan's verdict and the
wall time; then mean and sd over the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml
from harness import RESULTS, ROOT, device, simulate, table, write

from fedtune.common.config import ICD10_CHAPTERS

MINIMAL_ICD10 = {
    "data": {"source": "fedtune:icd10-chapters",
             "test_source": "fedtune:icd10-chapters-test",
             "text_column": "text", "label_column": "chapter",
             "labels": list(ICD10_CHAPTERS), "partition": "dirichlet",
             "dirichlet_alpha": 1.0, "max_samples_per_site": 1500},
    "federation": {"num_sites": 8},
}
ARMS = {"recipe": [], "train-tau0": ["train.logit_adjustment=0",
                                     "train.calibrate_decisions=false"]}


def _scenario(name: str, work: Path) -> Path:
    if name == "minimal-icd10":
        path = work / "minimal-icd10.yaml"
        path.write_text(yaml.safe_dump(MINIMAL_ICD10))
        return path
    shipped = ROOT / "simulations" / f"{name}.yaml"
    if not shipped.is_file():
        raise SystemExit(f"unknown scenario {name!r}: minimal-icd10 or a shipped "
                         "one (simulations/NAME.yaml)")
    return shipped


def _per_class(ev: dict[str, Any], labels: list[str], prefix: str = ""
               ) -> dict[str, dict[str, float | None]]:
    """{label: {precision, recall, f1}} from the evaluator's keys (``prefix`` ""
    for the calibration's dicts, ``eval_`` with underscores for a round line)."""
    out = {}
    for label in labels:
        key = label if not prefix else label.replace("-", "_")
        sep = "-" if not prefix else "_"
        out[label] = {m: ev.get(f"{prefix}{m}{sep}{key}")
                      for m in ("precision", "recall", "f1")}
    return out


def _rule(ev: dict[str, Any], labels: list[str], prefix: str = "") -> dict[str, Any]:
    sep = "-" if not prefix else "_"
    return {"macro_f1": ev.get(f"{prefix}macro{sep}f1"),
            "accuracy": ev.get(f"{prefix}accuracy"),
            "per_class": _per_class(ev, labels, prefix)}


def one_run(scenario: Path, arm: str, run_dir: Path, labels: list[str]
            ) -> dict[str, Any]:
    rows, wall = simulate(run_dir, ARMS[arm], scenario=scenario)
    return read_run(run_dir, rows, labels, wall)


def read_run(run_dir: Path, rows: list[dict[str, Any]], labels: list[str],
             wall: float | None) -> dict[str, Any]:
    """One run's figures from its run directory (``rows``: round > 0)."""
    last = rows[-1]
    plan = json.loads((run_dir / "plan.json").read_text())
    out: dict[str, Any] = {"wall_s": wall, "epsilon_max": last.get("epsilon_max"),
                           "plan_overall": plan["overall"],
                           "eval_seconds": [r.get("eval_seconds") for r in rows],
                           "bytes_received": [r.get("bytes_received") for r in rows],
                           "adapter_payload_bytes": last.get("adapter_payload_bytes"),
                           "sites": len(plan["sites"])}
    cal = next((r["calibration"] for r in reversed(rows) if r.get("calibration")),
               None)
    if cal:
        cands = {c["strength"]: c for c in cal["candidates"]}
        out["calibration"] = {"strength": cal["strength"],
                              "release": cal.get("release", "counts"),
                              "rule": cal.get("rule", "macro-f1"),
                              "margin": cal.get("margin"),
                              "excess": cal.get("excess"),
                              "test_per_class": {str(s): _per_class(c["test"], labels)
                                                 for s, c in cands.items()},
                              "epsilon_max": cal.get("epsilon_max"),
                              "val_macro_f1": {str(s): c["val_macro_f1"]
                                               for s, c in cands.items()},
                              "val_precision": {str(s): c["val_precision"]
                                                for s, c in cands.items()},
                              "val_recall": {str(s): c["val_recall"]
                                             for s, c in cands.items()}}
        out["rules"] = {"calibrated": _rule(cal["eval"], labels),
                        "tau1 (strength 0)": _rule(cands[0.0]["test"], labels),
                        "tau0 (strength 1)": _rule(cands[max(cands)]["test"], labels)}
    else:
        out["rules"] = {"as trained": _rule(last, labels, "eval_")}
    return out


def _summary(runs: list[dict[str, Any]], rule: str) -> dict[str, Any]:
    vals = [r["rules"][rule] for r in runs if rule in r["rules"]]

    def stat(xs: list[float | None]) -> dict[str, float | None]:
        xs2 = [x for x in xs if x is not None]
        if not xs2:
            return {"mean": None, "sd": None}
        return {"mean": statistics.fmean(xs2),
                "sd": statistics.stdev(xs2) if len(xs2) > 1 else 0.0}

    labels = list(vals[0]["per_class"]) if vals else []
    return {"runs": len(vals),
            "macro_f1": stat([v["macro_f1"] for v in vals]),
            "accuracy": stat([v["accuracy"] for v in vals]),
            "per_class": {lab: {m: stat([v["per_class"][lab][m] for v in vals])
                                for m in ("precision", "recall", "f1")}
                          for lab in labels}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="minimal-icd10,imbalanced")
    p.add_argument("--arms", default="recipe,train-tau0")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--read", nargs="+", metavar="RUN_DIR=WALL_S",
                   help="summarise runs already made (of --scenario's one scenario "
                        "and --arms' one arm) instead of running them")
    args = p.parse_args()
    if args.read:
        _summarise_runs(args)
        return
    work = Path(tempfile.mkdtemp(prefix="fedtune-calibration-"))
    for name in args.scenario.split(","):
        scenario = _scenario(name, work)
        raw = yaml.safe_load(scenario.read_text())
        labels = list(raw["data"]["labels"])
        result: dict[str, Any] = {"device": device(), "scenario": name,
                                  "config": raw, "arms": {}}
        for arm in args.arms.split(","):
            runs = []
            for k in range(args.runs):
                runs.append(one_run(scenario, arm, work / f"{name}-{arm}-{k}",
                                    labels))
                r = runs[-1]
                print(f"{name} {arm} run {k + 1}: " + ", ".join(
                    f"{rule} macro-F1 {v['macro_f1']:.3f}"
                    for rule, v in r["rules"].items())
                    + f" ({r['wall_s']:.0f} s, eps {r['epsilon_max']:.3f})",
                    flush=True)
            rules = list(runs[0]["rules"])
            result["arms"][arm] = {"runs": runs,
                                   "summary": {rule: _summary(runs, rule)
                                               for rule in rules}}
            write(args.out, f"calibration-{name}", result)
        path = write(args.out, f"calibration-{name}", result)
        body = []
        for arm, res in result["arms"].items():
            for rule, s in res["summary"].items():
                worst = min(s["per_class"].items(),
                            key=lambda kv: kv[1]["f1"]["mean"] or 0.0)
                body.append([arm, rule, s["runs"], s["macro_f1"]["mean"],
                             s["macro_f1"]["sd"], s["accuracy"]["mean"],
                             f"{worst[0]} {worst[1]['f1']['mean']:.3f}"])
        print(table(["arm", "decisions", "runs", "macro-F1", "sd", "accuracy",
                     "lowest class F1"], body))
        print(f"-> {path}")


def _summarise_runs(args: argparse.Namespace) -> None:
    name, arm = args.scenario.split(",")[0], args.arms.split(",")[0]
    work = Path(tempfile.mkdtemp(prefix="fedtune-calibration-"))
    raw = yaml.safe_load(_scenario(name, work).read_text())
    labels = list(raw["data"]["labels"])
    runs = []
    for item in args.read:
        path, _, wall = item.partition("=")
        rows = [json.loads(x) for x in (Path(path) / "metrics.jsonl").read_text()
                .splitlines() if x.strip()]
        runs.append(read_run(Path(path), [r for r in rows if r["round"] > 0],
                             labels, float(wall) if wall else None))
    result = {"device": device(), "scenario": name, "config": raw, "arms": {arm: {
        "runs": runs, "summary": {rule: _summary(runs, rule)
                                  for rule in runs[0]["rules"]}}}}
    print(f"-> {write(args.out, f'calibration-{name}', result)}")


if __name__ == "__main__":
    main()
