"""Which frozen encoder: the ICD-10 default's head on each offline encoder's
features, without DP and under DP.

    python bench/encoders.py [--encoders fedtune:all-MiniLM-L6-v2,...] [--seeds 5]

For each encoder (a ``model.name_or_path``), on the default's own split
(``simulations/default.yaml``: 8 label-skewed sites of 1,350 training records,
2,000 held-out records of categories no site holds):

- the encoding rate (records per second on this machine, fp32, the length-sorted
  batches fedtune uses);
- the zero-shot model: the head from the chapters' titles (round 0, ε 0);
- the non-private ceiling of a linear head: one centralised logistic regression
  on the 10,800 training records' pooled features (L-BFGS), the best of a
  weight-decay sweep scored on the test set, so an optimistic ceiling;
- the DP default: the default's 10 head rounds at ε=8 replayed on the features
  (``bench/dp_head_grid.py``'s federation: SGD at 1, batch 512, sqrt(records)
  steps, the class histogram, the label prior at the map's scale), ``--seeds``
  noise draws.

Results: ``OUT/encoders.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from dp_head_grid import DEFAULTS, features, replay
from harness import RESULTS, device, table, write

from fedtune.common import metrics, planning, recipes

DECAYS = (0.0, 1e-4, 1e-3, 1e-2)
RECIPE = {"opt": "sgd", "lr": 1.0, "steps": -1, "rounds": 10}


def ceiling(sites: list[tuple[torch.Tensor, torch.Tensor]],
            test: tuple[torch.Tensor, torch.Tensor], k: int) -> dict[str, float]:
    """The best test macro-F1 of a centralised logistic regression by weight decay."""
    x = torch.cat([s[0] for s in sites])
    y = torch.cat([s[1] for s in sites])
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs, xt = (x - mean) / std, (test[0] - mean) / std
    return {str(decay): _fit(xs, y, xt, test[1], k=k, decay=decay)
            for decay in DECAYS}


def _fit(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, *,
         k: int, decay: float) -> float:
    """Test macro-F1 of an L2-penalised logistic regression fitted by L-BFGS."""
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + decay * (w ** 2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        return metrics.macro_f1(yt.tolist(), (xt @ w + b).argmax(1).tolist(),
                                num_classes=k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders",
                   default="fedtune:all-MiniLM-L6-v2,fedtune:all-mpnet-base-v2")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    for name in args.encoders.split(","):
        t0 = time.perf_counter()
        sites, test, cfg, prior = features(name)
        seconds = time.perf_counter() - t0
        records = sum(len(y) for _, y in sites) + len(test[1])
        k = len(cfg.data.labels)
        # the server's rule: the scale for the federation's typical site
        typical = planning.typical_site([len(y) for _, y in sites], "examples")
        scale = recipes.prior_scale(typical or 0)
        point = {**DEFAULTS, **RECIPE, "prior": scale}
        dp = [replay(sites, test, point, k=k, seed=s, prior=prior)
              for s in range(args.seeds)]
        sweep = ceiling(sites, test, k)
        rows.append({
            "encoder": name, "width": int(test[0].shape[1]),
            "records_per_second": records / seconds, "encode_seconds": seconds,
            "zero_shot_macro_f1": dp[0][0], "nonprivate_ceiling_macro_f1":
            max(sweep.values()), "nonprivate_by_weight_decay": sweep,
            "prior_scale": scale,
            "dp_macro_f1_mean": statistics.fmean(c[-1] for c in dp),
            "dp_macro_f1_sd": statistics.stdev(c[-1] for c in dp)
            if len(dp) > 1 else None,
            "dp_macro_f1_runs": [c[-1] for c in dp], "seeds": args.seeds})
        print(f"{name}: {rows[-1]['records_per_second']:.0f} records/s, zero-shot "
              f"{rows[-1]['zero_shot_macro_f1']:.3f}, ceiling "
              f"{rows[-1]['nonprivate_ceiling_macro_f1']:.3f}, DP "
              f"{rows[-1]['dp_macro_f1_mean']:.3f}", flush=True)
    path = write(args.out, "encoders", {
        "device": device(), "task": "simulations/default.yaml: ICD-10 chapters, "
        "8 sites x 1,350 training records, 2,000 held-out records", "epsilon": 8.0,
        "recipe": RECIPE, "rows": rows})
    print(table(["encoder", "records/s", "zero-shot", "non-private ceiling",
                 "DP mean", "DP sd"],
                [[r["encoder"], r["records_per_second"], r["zero_shot_macro_f1"],
                  r["nonprivate_ceiling_macro_f1"], r["dp_macro_f1_mean"],
                  r["dp_macro_f1_sd"] or "-"] for r in rows]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
