"""Replay of the default's head-only DP rounds on cached features: a fast search
over the head recipe (learning rate, epochs, batch, logit adjustment, histogram
noise, feature normalisation, head width, DP-AdamBC).

    python bench/dp_head_grid.py [--grid NAME] [--seeds 2] [--out DIR]

The default run (``simulations/default.yaml``) trains only the classification head
on each record's pooled MiniLM features (LoRA frozen). This script computes those
features once with fedtune's own data and model code (the same 8 label-skewed sites
and test set), then replays the federation in plain torch: per site, a noisy class
histogram (``privacy.count_noise_multiplier``) for the logit adjustment, Poisson
batches, per-record clipping to 1 and Gaussian noise with sigma calibrated by
``fedtune.common.accounting`` to epsilon 8 over the whole run (histogram included),
AdamW with the trainer's linear decay, FedAvg by records. A configuration takes
seconds instead of the 4-5 minutes of ``fedtune simulate``, so each point is the
mean over ``--seeds`` noise draws.

Checked against the real run: the shipped recipe replays at macro-F1 0.601 (mean of
3 seeds) where ``fedtune simulate`` measured 0.609 (bench/results/
privacy_utility.json). Differences: features are computed once without the head's
dtype cast; the noise is seeded. Results: ``OUT/dp_head_grid.json``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import statistics
import time
from typing import Any

import torch
from harness import MAIN, RESULTS, device, table, write
from torch import nn

from fedtune.common import recipes

GRIDS: dict[str, dict[str, list[Any]]] = {
    # each grid moves one or two knobs of the shipped recipe (DEFAULTS)
    "recipe": {"lr": [0.03, 0.1, 0.2], "epochs": [5, 10, 20]},
    "logit-adjustment": {"tau": [0.0, 0.5, 1.0]},
    "histogram": {"count_sigma": [5.0, 10.0, 20.0]},
    "features": {"norm": [0.0, 3.0]},  # pooled features as they are, or L2 * 3
    "mlp": {"hidden": [256], "lr": [0.03, 0.1]},
    "adambc": {"adambc_gamma": [1e-8, 1e-5, 1e-4]},
    "nonprivate": {"epsilon": [0.0], "norm": [0.0, 3.0], "hidden": [0, 256],
                   "lr": [0.03, 0.1]},
    # stabilisers: server EMA of the global head over rounds (the served model),
    # each site's tail average of its iterates, more rounds of fewer epochs
    "stability": {"ema": [0.0, 0.5, 0.8], "tail": [0.0, 0.5]},
    "stability-rounds": {"rounds": [10], "epochs": [5], "ema": [0.0, 0.5, 0.8]},
    # where the spread comes from: the noisy class prior, the step size, DP itself
    "spread-prior": {"tau": [0.0], "count_sigma": [5.0]},
    "spread-step": {"lr": [0.03], "epochs": [20]},
    "spread-nodp": {"epsilon": [0.0]},
    # smaller steps, more of them: the noise's random walk shrinks with the step
    "small-steps": {"lr": [0.01, 0.02, 0.03], "epochs": [20, 40]},
    # SGD with momentum: a noise-only coordinate moves by lr * noise, not by ~lr
    "sgd": {"opt": ["sgd"], "lr": [3.0, 10.0, 30.0], "epochs": [10, 20]},
    "sgd-small": {"opt": ["sgd"], "lr": [0.3, 1.0, 2.0], "epochs": [10, 20, 40]},
    # the batch at small sites (each site's first 150 records) and at the default's
    "small-sites": {"site_records": [150], "batch": [32, 64, 150, 512]},
    "batch": {"batch": [128, 256, 512, 1350]},
    # train.recipe auto's batch and epochs by site size, with the shipped SGD head
    # (10 rounds; site_records 0: every record, 1,350 per site)
    "auto-size": {"site_records": [150, 500, 0], "batch": [64, 128, 512],
                  "epochs": [10, 20, 40], "opt": ["sgd"], "lr": [1.0],
                  "rounds": [10]},
    # the rule auto took from it: a number of DP steps per round at every size
    # (batch 512, capped at the site's records; epochs = steps x sampling rate)
    "auto-steps": {"site_records": [150, 500, 0], "steps": [10, 20, 25, 40, 53],
                   "opt": ["sgd"], "lr": [1.0], "rounds": [10]},
    # that rule, as fedtune.common.recipes.head_steps applies it (steps -1)
    "auto-rule": {"site_records": [150, 500, 0], "steps": [-1], "opt": ["sgd"],
                  "lr": [1.0], "rounds": [10]},
    # model.head_init labels: the head starts from the label descriptions'
    # embeddings at this scale (0: at zero), by site size, with the shipped head
    # (fedtune.common.recipes.PRIOR_SCALE_MAP is read off it)
    "prior": {"site_records": [150, 300, 500, 0],
              "prior": [0.0, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 120.0],
              "steps": [-1], "opt": ["sgd"], "lr": [1.0], "rounds": [10]},
}
DEFAULTS: dict[str, Any] = {"epsilon": 8.0, "lr": 0.1, "epochs": 10, "batch": 512,
                            "tau": 1.0, "count_sigma": 20.0, "norm": 0.0,
                            "hidden": 0, "adambc_gamma": 0.0, "rounds": 5,
                            "ema": 0.0, "tail": 0.0, "opt": "adamw",
                            "site_records": 0, "steps": 0, "prior": 0.0}


def features(encoder: str = "") -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                         tuple[torch.Tensor, torch.Tensor], Any,
                                         torch.Tensor]:
    """Pooled encoder features of every site's training records and of the test
    set, computed with fedtune's own site split and model (``encoder``: another
    ``model.name_or_path`` than the default's); and the label prior's head rows at
    scale 1 (:func:`fedtune.common.priors.prior_weights`)."""
    from fedtune.client.site import site_data
    from fedtune.common import config, data, priors
    from fedtune.common.model import build_base, load_tokenizer
    from fedtune.common.standalone import mean_pool

    cfg = config.load(MAIN, [f"model.name_or_path={encoder}"] if encoder else [])
    tok = load_tokenizer(cfg.model.name_or_path)
    model = build_base(cfg.model, num_labels=len(cfg.data.labels)).eval()
    n = cfg.federation.num_sites

    @torch.no_grad()
    def pooled(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        got: list[torch.Tensor] = []
        model.head.register_forward_hook(lambda _m, a, _o: got.append(a[0]))
        loader = torch.utils.data.DataLoader(ds, batch_size=256, collate_fn=(
            functools.partial(data.collate, pad_id=int(tok.pad_token_id))))
        ys = []
        for b in loader:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            ys.append(b["labels"])
        model.head._forward_hooks.clear()
        return torch.cat(got), torch.cat(ys)

    sites = [pooled(site_data(cfg, {"partition-id": p, "num-partitions": n}).train)
             for p in range(n)]
    recs = data.read_records(cfg.data.test_source,
                             required=data.required_columns("classification",
                                                            cfg.data))
    test = data.encode_for_task(recs[: cfg.data.max_test_samples], tok,
                                task="classification", cfg=cfg.data,
                                source=cfg.data.test_source)
    enc = tok(priors.label_texts(cfg.data), padding=True, return_tensors="pt")
    with torch.no_grad():  # the head's input for each label text, as a record's
        labels = mean_pool(model.encoder, enc["input_ids"], enc["attention_mask"])
    return sites, pooled(test), cfg, priors.prior_weights(labels, scale=1.0)


@functools.cache
def noise(epsilon: float, q: float, steps: int, count_sigma: float) -> float:
    from fedtune.common.accounting import calibrate_noise

    return calibrate_noise(target_epsilon=epsilon, target_delta=1e-5,
                           sample_rate=q, steps=steps,
                           prefix=[(count_sigma, 1.0, 1)])


class AdamBC(torch.optim.Optimizer):
    """DP-AdamBC (Tang et al. 2023): Adam whose second moment has the DP noise's
    variance ``phi`` = (sigma C / B)^2 taken out, floored at ``gamma``."""

    def __init__(self, params: Any, *, lr: float, phi: float, gamma: float) -> None:
        super().__init__(params, {"lr": lr})
        self.phi, self.gamma, self.t = phi, gamma, 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        self.t += 1
        b1, b2 = 0.9, 0.999
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                v = (st["v"] / (1 - b2 ** self.t) - self.phi).clamp(min=self.gamma)
                p.add_(-group["lr"] * st["m"] / (1 - b1 ** self.t) / v.sqrt())


def clipped_grads(head: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  bias: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Sum over the batch of each record's gradient clipped to norm 1 (closed form
    for a linear or linear-GELU-linear head)."""
    with torch.no_grad():
        onehot = nn.functional.one_hot(y, k).float()
        if isinstance(head, nn.Linear):
            e = torch.softmax(head(x) + bias, 1) - onehot
            norm = e.norm(dim=1) * torch.sqrt((x ** 2).sum(1) + 1)
            e = e * (1.0 / (norm + 1e-6)).clamp(max=1.0)[:, None]
            return [e.T @ x, e.sum(0)]
        first, last = head[0], head[2]
        h = x @ first.weight.T + first.bias
        a = nn.functional.gelu(h)
        e = torch.softmax(last(a) + bias, 1) - onehot
        gelu_grad = (0.5 * (1 + torch.erf(h / math.sqrt(2)))
                     + h * torch.exp(-h * h / 2) / math.sqrt(2 * math.pi))
        d = (e @ last.weight) * gelu_grad
        norm = torch.sqrt((e ** 2).sum(1) * ((a ** 2).sum(1) + 1)
                          + (d ** 2).sum(1) * ((x ** 2).sum(1) + 1))
        f = (1.0 / (norm + 1e-6)).clamp(max=1.0)[:, None]
        e, d = e * f, d * f
        return [d.T @ x, d.sum(0), e.T @ a, e.sum(0)]


def new_head(width: int, k: int, hidden: int) -> nn.Module:
    head: nn.Module = (nn.Sequential(nn.Linear(width, hidden), nn.GELU(),
                                     nn.Linear(hidden, k)) if hidden
                       else nn.Linear(width, k))
    out = head[2] if hidden else head  # type: ignore[index]
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return head


def site_round(head: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
               p: dict[str, Any], k: int, gen: torch.Generator) -> None:
    """One site's head-only round, in place (DP when ``p['epsilon']`` > 0)."""
    n, dp = len(x), p["epsilon"] > 0
    q = min(1.0, p["batch"] / n)
    steps = (recipes.head_steps(n) if p["steps"] == -1 else
             p["steps"] or max(1, round(p["epochs"] / q)))
    counts = torch.bincount(y, minlength=k).float()
    if dp:
        counts += torch.randn(k, generator=gen) * p["count_sigma"]
    prior = counts.clamp(min=0.5)
    bias = p["tau"] * torch.log(prior / prior.sum())
    sigma = (noise(p["epsilon"], q, steps * p["rounds"], p["count_sigma"])
             if dp else 0.0)
    opt = (AdamBC(head.parameters(), lr=p["lr"], phi=(sigma / p["batch"]) ** 2,
                  gamma=p["adambc_gamma"]) if p["adambc_gamma"] else
           torch.optim.SGD(head.parameters(), lr=p["lr"], momentum=0.9)
           if p["opt"] == "sgd" else
           torch.optim.AdamW(head.parameters(), lr=p["lr"], weight_decay=0.0))
    params = list(head.parameters())
    start_avg = steps - int(p["tail"] * steps)  # the tail's first step
    avg = [torch.zeros_like(w) for w in params]
    for step in range(steps):
        for group in opt.param_groups:  # the trainer's linear decay, no warm-up
            group["lr"] = p["lr"] * (steps - step) / steps
        if dp:
            pick = torch.rand(n, generator=gen) < q
            grads = clipped_grads(head, x[pick], y[pick], bias, k)
            for param, g in zip(params, grads, strict=True):
                param.grad = (g + torch.randn(g.shape, generator=gen) * sigma
                              ) / (q * n)  # Opacus' expected batch
        else:
            idx = torch.randint(0, n, (p["batch"],), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(head(x[idx]) + bias, y[idx]).backward()
        opt.step()
        if step >= start_avg:  # Polyak: the site sends its tail's mean iterate
            with torch.no_grad():
                for a, w in zip(avg, params, strict=True):
                    a.add_(w, alpha=1.0 / (steps - start_avg))
    if p["tail"]:
        with torch.no_grad():
            for a, w in zip(avg, params, strict=True):
                w.copy_(a)


def replay(sites: list[tuple[torch.Tensor, torch.Tensor]],
           test: tuple[torch.Tensor, torch.Tensor], p: dict[str, Any], *, k: int,
           seed: int, prior: torch.Tensor | None = None) -> list[float]:
    """The federation's rounds; macro-F1 on the test set after each (and before
    the first where ``p['prior']`` starts the head from ``prior`` at that
    scale)."""
    from fedtune.common import metrics

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def prep(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=1, keepdim=True) * p["norm"] if p["norm"] else x

    keep = p["site_records"] or None
    local = [(prep(x[:keep]), y[:keep]) for x, y in sites]
    xt = prep(test[0])
    glob = new_head(xt.shape[1], k, p["hidden"])
    served = new_head(xt.shape[1], k, p["hidden"])  # the EMA of the global heads
    curve = []
    if p["prior"] and prior is not None:  # model.head_init labels (linear head)
        with torch.no_grad():
            glob.weight.copy_(p["prior"] * prior)
            served.load_state_dict(glob.state_dict())
            zero_shot = metrics.macro_f1(test[1].tolist(),
                                         glob(xt).argmax(1).tolist(), num_classes=k)
        curve.append(zero_shot)
    for rnd in range(p["rounds"]):
        states, weights = [], []
        for x, y in local:
            head = new_head(xt.shape[1], k, p["hidden"])
            head.load_state_dict(glob.state_dict())
            site_round(head, x, y, p=p, k=k, gen=gen)
            states.append(head.state_dict())
            weights.append(len(x))
        glob.load_state_dict({name: sum(w * s[name] for w, s in
                                        zip(weights, states, strict=True))
                              / sum(weights) for name in states[0]})
        beta = p["ema"] if rnd else 0.0  # round 1: the EMA starts there
        served.load_state_dict({name: beta * v + (1 - beta) * glob.state_dict()[name]
                                for name, v in served.state_dict().items()})
        with torch.no_grad():
            pred = served(xt).argmax(1).tolist()
        curve.append(metrics.macro_f1(test[1].tolist(), pred, num_classes=k))
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default=",".join(GRIDS),
                   help=f"comma-separated: {', '.join(GRIDS)}")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    t0 = time.perf_counter()
    sites, test, cfg, prior = features()
    k = len(cfg.data.labels)
    print(f"features of {sum(len(y) for _, y in sites)} site records and "
          f"{len(test[1])} test records in {time.perf_counter() - t0:.0f} s",
          flush=True)
    rows = []
    for name in args.grid.split(","):
        grid = GRIDS[name]
        for values in itertools.product(*grid.values()):
            point = {**DEFAULTS, **dict(zip(grid, values, strict=True))}
            finals, curves = [], []
            for seed in range(args.seeds):
                curve = replay(sites, test, point, k=k, seed=seed, prior=prior)
                finals.append(curve[-1])
                curves.append(curve[-point["rounds"]:])
                zero = curve[0] if len(curve) > point["rounds"] else None
            rows.append({"grid": name, **{key: point[key] for key in grid},
                         "point": point, "macro_f1": statistics.fmean(finals),
                         "macro_f1_sd": statistics.stdev(finals)
                         if len(finals) > 1 else None,
                         "macro_f1_seeds": finals, "zero_shot": zero,
                         "macro_f1_by_round": [statistics.fmean(c) for c in
                                               zip(*curves, strict=True)]})
            print(f"{name} {dict(zip(grid, values, strict=True))}: macro-F1 "
                  f"{rows[-1]['macro_f1']:.3f} sd {rows[-1]['macro_f1_sd'] or 0:.4f}",
                  flush=True)
    stem = "dp_head_grid" if args.grid == ",".join(GRIDS) else (
        "dp_head_grid-" + args.grid.replace(",", "+"))
    path = write(args.out, stem, {
        "device": device(), "task": "simulations/default.yaml, head-only rounds "
        "replayed on cached features", "defaults": DEFAULTS, "seeds": args.seeds,
        "results": rows})
    print(table(["grid", "setting", "macro-F1 (mean)", "seeds"],
                [[r["grid"], ", ".join(f"{key}={r['point'][key]}" for key in
                                       GRIDS[r["grid"]]), r["macro_f1"],
                  " ".join(f"{v:.3f}" for v in r["macro_f1_seeds"])]
                 for r in rows]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
