"""Privacy-utility: federated vs centralized, at epsilon 1, 3, 8 and without DP.

    python bench/privacy_utility.py [--scenario default|drug-reviews]
                                    [--epsilons 1,3,8,inf] [--quick] [--out DIR]

For each epsilon (per site, over the whole run; ``inf`` = DP off), on the scenario's
held-out test set:

- **federated**: ``fedtune simulate simulations/SCENARIO.yaml`` as shipped (the
  default: 8 label-skewed hospitals of 1,500 ICD-10 records; drug-reviews: 8 sites
  of 63-117 reviews);
- **centralized, same recipe**: the same YAML with every record at one site
  (``federation.num_sites=1``, as many records as the federation holds in all):
  the recipe and its tuning are shared, only the data is pooled;
- **centralized non-private, tuned** (once): plain LoRA fine-tuning of the same
  model on the pooled records (batch 64, learning rate 5e-3 or 1e-2, up to 3
  epochs), scored after every epoch; the best score on the test set is kept, so
  this baseline is if anything optimistic.

The headline is federated DP(8) macro-F1 over the best centralized non-private
macro-F1, with accuracy beside it, the majority-class score and per-class F1.
``--quick``: 1 round on 64 records per site, 300 test records, epsilons 8 and inf
unless ``--epsilons`` says otherwise (a smoke run for ``bench/run_all``: each
DP-SGD step of LoRA on all-MiniLM-L6-v2 costs about 45 ms per record on one CPU
core, so a site's records are its wall time; its figures are not the headline
ones).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness import RESULTS, ROOT, device, simulate, table, write

QUICK = ["federation.num_rounds=1", "train.linear_probe_rounds=0",
         "privacy.linear_probe_budget=0", "data.max_samples_per_site=64",
         "data.max_test_samples=300", "train.local_epochs=1"]
GRID = (5e-3, 1e-2)  # learning rates of the tuned non-private baseline


def _privacy(eps: float) -> list[str]:
    if math.isinf(eps):
        return ["privacy.enabled=false"]
    return [f"privacy.target_epsilon={eps:g}"]


def _scores(row: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    per_class = {lab: row.get(f"eval_f1_{lab.replace('-', '_')}") for lab in labels}
    return {"accuracy": row["eval_accuracy"], "macro_f1": row["eval_macro_f1"],
            "eval_loss": row["eval_loss"], "collapsed": bool(row.get("eval_collapsed")),
            "f1_by_class": per_class,
            "classes_f1_zero": sum(1 for v in per_class.values() if v == 0)}


def run(setting: str, eps: float, scenario: Path, work: Path, extra: list[str],
        labels: list[str]) -> dict[str, Any]:
    rows, wall = simulate(work / f"{setting}-{eps:g}", [*extra, *_privacy(eps)],
                          scenario=scenario)
    last = rows[-1]
    return {"setting": setting, "epsilon_target": eps,
            "epsilon_spent_max": last.get("epsilon_max"), "wall_s": wall,
            "rho_max": last.get("rho_max"), **_scores(last, labels)}


def pooled(cfg: Any) -> list[str]:
    """Overrides that put every record of the federation at one site."""
    from fedtune.common import sites

    total = sum(n for _, n in sites.simulated_sites(cfg))
    cap = math.ceil(total / (1 - cfg.data.val_fraction)) + 1
    return ["federation.num_sites=1", "federation.min_train_nodes=1",
            "federation.min_replies=1", f"data.max_samples_per_site={cap}"]


def tuned_baseline(cfg: Any, extra: list[str]) -> dict[str, Any]:
    """Plain non-private LoRA fine-tuning on the pooled records, best of a grid."""
    from fedtune.client import trainer
    from fedtune.client.site import site_data
    from fedtune.common import loops
    from fedtune.common.model import adapter_state, build_model, load_tokenizer
    from fedtune.server.runtime.central_eval import CentralEvaluator

    t0 = time.perf_counter()
    site = site_data(cfg, {"partition-id": 0, "num-partitions": 1})
    pad = int(load_tokenizer(cfg.model.name_or_path).pad_token_id)
    dev = loops.resolve_device("auto")
    epochs = 1 if extra else 3
    best: dict[str, Any] = {"macro_f1": -1.0}
    curve = []
    for lr in GRID[:1] if extra else GRID:
        train_cfg = replace(cfg.train, batch_size=64, learning_rate=lr,
                            local_epochs=1, linear_probe_rounds=0, warmup_ratio=0.0,
                            logit_adjustment=0.0, class_weighting="none")
        model = build_model(replace(cfg.model, head_init="random"), cfg.lora,
                            num_labels=len(cfg.data.labels), seed=cfg.train.seed)
        evaluator = CentralEvaluator(cfg, model, dev)
        for epoch in range(1, epochs + 1):
            trainer.train_local(model, site.train, site.val, task=cfg.model.task,
                                train_cfg=train_cfg,
                                privacy_cfg=replace(cfg.privacy, enabled=False),
                                noise_multiplier=0.0, device=dev, pad_id=pad,
                                seed=cfg.train.seed + epoch)
            s = evaluator(adapter_state(model))
            row = {"eval_accuracy": s["accuracy"], "eval_macro_f1": s["macro-f1"],
                   "eval_loss": s["loss"], **{f"eval_{k.replace('-', '_')}": v
                                               for k, v in s.items()}}
            point = {"learning_rate": lr, "epochs": epoch,
                     **_scores(row, list(cfg.data.labels))}
            curve.append({k: point[k] for k in ("learning_rate", "epochs",
                                                 "accuracy", "macro_f1")})
            print(f"  tuned baseline lr {lr:g} epoch {epoch}: macro-F1 "
                  f"{point['macro_f1']:.3f}", flush=True)
            if point["macro_f1"] > best["macro_f1"]:
                best = point
    return {"setting": "centralized non-private, tuned LoRA", "epsilon_target":
            math.inf, "epsilon_spent_max": None, "records": len(site.train),
            "wall_s": time.perf_counter() - t0, "rho_max": None, "grid": curve,
            **best}


def majority(cfg: Any) -> dict[str, float]:
    """Accuracy and macro-F1 of always predicting the most frequent test label."""
    from fedtune.common import data, metrics

    recs = data.read_records(cfg.data.test_source, required=data.required_columns(
        cfg.model.task, cfg.data))
    if cfg.data.max_test_samples:
        recs = recs[: cfg.data.max_test_samples]
    ys = data.label_ids(recs, column=cfg.data.label_column, labels=cfg.data.labels)
    top = Counter(ys).most_common(1)[0][0]
    pred = [top] * len(ys)
    return {"accuracy": metrics.accuracy(ys, pred),
            "macro_f1": metrics.macro_f1(ys, pred, num_classes=len(cfg.data.labels))}


def main() -> None:
    from fedtune.common import config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="default",
                   help="a YAML under simulations/ (default, drug-reviews)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epsilons", default=None,
                   help="comma-separated (default 1,3,8,inf; --quick: 8,inf)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the tuned non-private LoRA baseline (then the "
                   "headline uses OUT/privacy_utility-baseline.json if present)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    scenario = ROOT / "simulations" / f"{args.scenario}.yaml"
    extra = QUICK if args.quick else []
    cfg = config.load(scenario, extra)
    labels = list(cfg.data.labels)
    central = [*extra, *pooled(cfg)]
    work = Path(tempfile.mkdtemp(prefix="fedtune-privacy-utility-"))
    name = "privacy_utility" + ("" if args.scenario == "default"
                                else f"-{args.scenario}") + ("-quick" if args.quick
                                                             else "")
    saved = Path(args.out) / f"{name}-baseline.json"
    if args.no_baseline:
        results = (json.loads(saved.read_text())["results"] if saved.is_file()
                   else [])
    else:
        results = [tuned_baseline(config.load(scenario, central), extra)]
        write(args.out, f"{name}-baseline", {"device": device(), "results": results})
    chosen = args.epsilons if args.epsilons is not None else (
        "8,inf" if args.quick else "1,3,8,inf")
    epsilons = [float(e) for e in chosen.split(",") if e]
    if not epsilons and (Path(args.out) / f"{name}.json").is_file():
        # a baseline-only run: add it to the curve measured before, re-headline
        earlier = json.loads((Path(args.out) / f"{name}.json").read_text())
        results += [r for r in earlier["results"]
                    if r["setting"] in ("federated", "centralized, same recipe")]
    for eps in epsilons:
        results.append(run("federated", eps, scenario, work, extra, labels))
        results.append(run("centralized, same recipe", eps, scenario, work, central,
                           labels))
        print(f"epsilon {eps:g}: federated macro-F1 {results[-2]['macro_f1']:.3f}, "
              f"centralized {results[-1]['macro_f1']:.3f}", flush=True)
    nonprivate = [r for r in results if r["setting"] != "federated"
                  and math.isinf(r["epsilon_target"])]
    best = max(nonprivate, key=lambda r: r["macro_f1"], default=None)
    fed8 = next((r for r in results if r["setting"] == "federated"
                 and r["epsilon_target"] == 8.0), None)
    headline = ({"macro_f1_ratio": fed8["macro_f1"] / best["macro_f1"],
                 "accuracy_ratio": fed8["accuracy"] / best["accuracy"],
                 "baseline": best["setting"]} if fed8 and best else None)
    path = write(args.out, name, {
        "device": device(), "task": f"simulations/{args.scenario}.yaml",
        "quick": args.quick, "overrides": extra, "majority_class": majority(cfg),
        "headline_federated_dp8_over_best_central_nonprivate": headline,
        "results": results})
    print(table(["setting", "epsilon", "spent", "macro-F1", "acc", "F1=0 classes",
                 "collapsed", "rho max", "wall s"],
                [[r["setting"], r["epsilon_target"], r["epsilon_spent_max"] or math.inf,
                  r["macro_f1"], r["accuracy"], r["classes_f1_zero"], r["collapsed"],
                  r["rho_max"] if r["rho_max"] is not None else "-", r["wall_s"]]
                 for r in results]))
    maj = majority(cfg)
    print(f"majority class: accuracy {maj['accuracy']:.3f}, macro-F1 "
          f"{maj['macro_f1']:.3f}")
    if headline:
        print(f"federated DP(8) / best centralized non-private ({headline['baseline']})"
              f": macro-F1 {headline['macro_f1_ratio']:.3f}, accuracy "
              f"{headline['accuracy_ratio']:.3f}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
