"""Privacy-utility curve on the default task: federated vs centralized training.

    python bench/privacy_utility.py [--quick] [--epsilons 1,3,8,inf] [--out DIR]

For each epsilon (per site for the federation, over the whole run; ``inf`` = DP off):

- **federated**: ``fedtune simulate simulations/default.yaml`` (8 non-IID hospitals,
  5 rounds of 2 local epochs, DP-SGD calibrated to the epsilon);
- **centralized**: all the training records in one place, trained in-process with
  the same trainer, model, hyper-parameters and number of passes over the data
  (rounds x local epochs), DP-SGD calibrated to the same epsilon over the run.

Both are scored on the same held-out test set. The headline is federated-DP(8) /
centralized-non-private, for accuracy and macro-F1. ``--quick``: 1 round of 2 local
steps of batch 16 at 64 tokens, 300 test records (a smoke run for ``bench/run_all``;
its figures are not the headline ones).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness import DEFAULT, RESULTS, device, simulate, table, write

QUICK = ["federation.num_rounds=1", "train.max_steps=2", "train.batch_size=16",
         "data.max_length=64", "data.max_test_samples=300"]


def _privacy(eps: float) -> list[str]:
    if math.isinf(eps):
        return ["privacy.enabled=false"]
    return [f"privacy.target_epsilon={eps:g}"]


def federated(eps: float, work: Path, extra: list[str]) -> dict[str, Any]:
    rows, wall = simulate(work / f"fed-{eps:g}", [*extra, *_privacy(eps)])
    last = rows[-1]
    return {"setting": "federated", "epsilon_target": eps,
            "epsilon_spent_max": last["epsilon_max"],
            "accuracy": last["eval_accuracy"], "macro_f1": last["eval_macro_f1"],
            "eval_loss": last["eval_loss"], "wall_s": wall}


def centralized(eps: float, extra: list[str]) -> dict[str, Any]:
    """All records in one place: one long local run of the same trainer."""
    from fedtune.client import privacy, trainer
    from fedtune.client.app import site_data
    from fedtune.common import config
    from fedtune.common.model import adapter_state, build_model, load_tokenizer
    from fedtune.server.evaluate import CentralEvaluator

    t0 = time.perf_counter()
    cfg = config.load(DEFAULT, [*extra, *_privacy(eps)])
    rounds = cfg.federation.num_rounds
    epochs = rounds * cfg.train.local_epochs
    cfg = replace(cfg, train=replace(cfg.train, local_epochs=epochs,
                                     max_steps=cfg.train.max_steps * rounds))
    site = site_data(cfg, {"data-path": cfg.data.source})
    model = build_model(cfg.model, cfg.lora, num_labels=len(cfg.data.labels),
                        seed=cfg.train.seed)
    pad = int(load_tokenizer(cfg.model.name_or_path).pad_token_id)
    q = privacy.sample_rate(batch_size=cfg.train.batch_size,
                            num_examples=len(site.train))
    steps = privacy.steps_per_round(sample_rate_=q, epochs=epochs,
                                    max_steps=cfg.train.max_steps)
    sigma = (privacy.plan_noise(cfg.privacy, sample_rate_=q, steps_per_round_=steps,
                                num_rounds=1) if cfg.privacy.enabled else 0.0)
    dev = trainer.resolve_device("auto")
    res = trainer.train_local(model, site.train, site.val, task=cfg.model.task,
                              train_cfg=cfg.train, privacy_cfg=cfg.privacy,
                              noise_multiplier=sigma, device=dev, pad_id=pad,
                              seed=cfg.train.seed)
    spent = (privacy.epsilon_spent([(sigma, res.sample_rate, res.steps)],
                                   delta=cfg.privacy.target_delta,
                                   accountant=cfg.privacy.accountant)
             if cfg.privacy.enabled else math.inf)
    scores = CentralEvaluator(cfg, model, dev)(adapter_state(model))
    return {"setting": "centralized", "epsilon_target": eps,
            "epsilon_spent_max": spent, "records": len(site.train),
            "accuracy": scores["accuracy"], "macro_f1": scores["macro-f1"],
            "eval_loss": scores["loss"], "wall_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epsilons", default="1,3,8,inf")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    extra = QUICK if args.quick else []
    epsilons = [float(e) for e in args.epsilons.split(",")]
    work = Path(tempfile.mkdtemp(prefix="fedtune-privacy-utility-"))
    results = []
    for eps in epsilons:
        results.append(centralized(eps, extra))
        results.append(federated(eps, work, extra))
        print(f"epsilon {eps:g}: central acc {results[-2]['accuracy']:.3f}, "
              f"federated acc {results[-1]['accuracy']:.3f}", flush=True)

    def pick(setting: str, eps: float) -> dict[str, Any] | None:
        return next((r for r in results if r["setting"] == setting
                     and r["epsilon_target"] == eps), None)

    fed8, central_inf = pick("federated", 8.0), pick("centralized", math.inf)
    headline = ({"accuracy_ratio": fed8["accuracy"] / central_inf["accuracy"],
                 "macro_f1_ratio": fed8["macro_f1"] / central_inf["macro_f1"]}
                if fed8 and central_inf else None)
    path = write(args.out, "privacy_utility" + ("-quick" if args.quick else ""), {
        "device": device(), "task": "simulations/default.yaml", "quick": args.quick,
        "overrides": extra, "headline_federated_dp8_over_central_nonprivate": headline,
        "results": results})
    print(table(["setting", "epsilon", "spent", "acc", "macro-F1", "loss", "wall s"],
                [[r["setting"], r["epsilon_target"], r["epsilon_spent_max"] or math.inf,
                  r["accuracy"], r["macro_f1"], r["eval_loss"], r["wall_s"]]
                 for r in results]))
    if headline:
        print(f"federated DP(8) / centralized non-private: accuracy "
              f"{headline['accuracy_ratio']:.3f}, macro-F1 "
              f"{headline['macro_f1_ratio']:.3f}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
