"""DP overhead: a local training step with Opacus DP-SGD / without, per model,
sequence length and per-sample-gradient mode.

    python bench/dp_overhead.py [--quick] [--device cpu|cuda] [--steps 8]
                                [--lengths 64,256] [--batch 16] [--out DIR]

The step is fedtune's own (``trainer.train_step``: per-sample loss, backward,
clipping, noise, AdamW) on the two default models: all-MiniLM-L6-v2 + LoRA r=8 with
the classification head, and SmolLM2-135M-Instruct + LoRA r=8 on q/v (causal LM).
Batches are random token ids of the given length (the step's cost does not depend
on which tokens). Non-private steps clip the batch gradient like the trainer does.

For each Opacus ``grad_sample_mode`` (hooks, functorch, ew) the script also checks
correctness: with zero noise and plain SGD (lr 1), one step must move the adapter
exactly as the reference mode (hooks) does, to a relative 1e-4. The fastest mode
that passes is reported next to fedtune's default (``privacy.grad_sample_mode``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import Any

import torch
from harness import MODELS, RESULTS, device, sync, table, write

MODES = ["hooks", "functorch", "ew"]


def _batch(task: str, *, size: int, length: int, vocab: int,
           dev: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(5, vocab, (size, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "classification":
        out["labels"] = torch.randint(0, 3, (size,), generator=g)
    else:
        mask = torch.zeros_like(ids)
        mask[:, length // 2:] = 1  # the "response" half carries the loss
        out["loss_mask"] = mask
    return {k: v.to(dev) for k, v in out.items()}


class Step:
    """A fresh model (same seed each time) and a step function in one mode."""

    def __init__(self, raw: dict[str, Any], *, mode: str | None, dev: torch.device,
                 sgd: bool = False) -> None:

        from fedtune.client import dpsgd, trainer
        from fedtune.common import config
        from fedtune.common.model import build_model

        cfg = config.from_dict({**raw, "train": {"batch_size": 16}})
        self.train_cfg = (replace(cfg.train, optimizer="sgd", momentum=0.0,
                                  learning_rate=1.0) if sgd else cfg.train)
        self.task = cfg.model.task
        labels = 3 if self.task == "classification" else 0
        self.model = build_model(cfg.model, cfg.lora, num_labels=labels, seed=0).to(dev)
        self.model.train()  # Opacus records activations in training mode only
        if sgd:  # the correctness check compares exact updates: no dropout masks
            for mod in self.model.modules():
                if isinstance(mod, torch.nn.Dropout):
                    mod.p = 0.0
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        opt = trainer.make_optimizer(self.params, self.train_cfg)
        self.net: torch.nn.Module = self.model
        self.dp = mode is not None
        if mode is not None:
            pcfg = replace(cfg.privacy, grad_sample_mode=mode)  # type: ignore[arg-type]
            self.net, opt = dpsgd.make_private(
                self.model, opt, cfg=pcfg, noise_multiplier=0.0 if sgd else 1.0,
                expected_batch_size=16)
        self.opt, self.dev = opt, dev

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        from fedtune.client import trainer

        trainer.train_step(self.net, self.opt, batch, task=self.task, dp=self.dp,
                           cfg=self.train_cfg, device=self.dev, params=self.params)

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().float().flatten().cpu() for p in self.params])

    def close(self) -> None:
        if self.dp:
            self.net._close()  # type: ignore[operator]


def time_step(raw: dict[str, Any], *, mode: str | None, batch: dict[str, torch.Tensor],
              steps: int, dev: torch.device, precision: str = "") -> float:
    """Median seconds of one step, after one warm-up step (``precision``: the
    train config's, e.g. bf16; empty: the default)."""
    step = Step(raw, mode=mode, dev=dev)
    if precision:
        step.train_cfg = replace(step.train_cfg, precision=precision)
    try:
        step(batch)
        times = []
        for _ in range(steps):
            sync(dev)
            t0 = time.perf_counter()
            step(batch)
            sync(dev)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        step.close()


def update(raw: dict[str, Any], *, mode: str, batch: dict[str, torch.Tensor],
           dev: torch.device) -> torch.Tensor:
    """The adapter's change after one noiseless SGD step (lr 1) in ``mode``."""
    step = Step(raw, mode=mode, dev=dev, sgd=True)
    try:
        before = step.flat()
        step(batch)
        return step.flat() - before
    finally:
        step.close()


def probe_ew(raw: dict[str, Any], *, batch: dict[str, torch.Tensor],
             dev: torch.device) -> None:
    """Opacus's expanded-weights mode, which fedtune's config does not offer: one
    forward pass shows why (its module takes one positional input)."""
    from opacus.grad_sample import wrap_model

    from fedtune.common.loops import per_sample_loss

    step = Step(raw, mode=None, dev=dev)
    gsm = wrap_model(step.model, "ew", batch_first=True, loss_reduction="mean")
    per_sample_loss(gsm, batch, task=step.task).mean().backward()
    raise RuntimeError("ew ran here, but fedtune's config does not offer it")


def bench(name: str, raw: dict[str, Any], *, length: int, size: int, steps: int,
          dev: torch.device) -> list[dict[str, Any]]:
    from fedtune.common.model import load_tokenizer

    tok = load_tokenizer(raw["model"]["name_or_path"],
                         raw["model"].get("gguf_file", ""))
    batch = _batch(raw["model"]["task"], size=size, length=length,
                   vocab=min(len(tok), 30000), dev=dev)
    base = time_step(raw, mode=None, batch=batch, steps=steps, dev=dev)
    ref = update(raw, mode="hooks", batch=batch, dev=dev)
    rows = [{"model": name, "seq_len": length, "batch": size, "mode": "no DP",
             "step_s": base, "ratio": 1.0, "correct": True, "error": ""}]
    for mode in MODES:
        row: dict[str, Any] = {"model": name, "seq_len": length, "batch": size,
                               "mode": mode}
        try:
            if mode == "ew":
                probe_ew(raw, batch=batch, dev=dev)
            got = update(raw, mode=mode, batch=batch, dev=dev)
            err = float((got - ref).norm() / ref.norm().clamp(min=1e-12))
            row["rel_diff_vs_hooks"] = err
            row["correct"] = err < 1e-4
            row["step_s"] = time_step(raw, mode=mode, batch=batch, steps=steps,
                                      dev=dev)
            row["ratio"] = row["step_s"] / base
            row["error"] = ""
        except Exception as exc:  # noqa: BLE001 - a mode Opacus cannot apply here
            row.update({"correct": False, "step_s": None, "ratio": None,
                        "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        rows.append(row)
        print(f"{name} L={length} {mode}: {row.get('ratio')}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="2 timed steps, length 32 (a smoke run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lengths", default="64,256")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    steps, lengths = ((2, [32]) if args.quick else
                      (args.steps, [int(x) for x in args.lengths.split(",")]))
    dev = torch.device(args.device)
    rows = [r for name, raw in MODELS.items() for n in lengths
            for r in bench(name, raw, length=n, size=args.batch, steps=steps, dev=dev)]
    from fedtune.common.config import PrivacyConfig

    default = PrivacyConfig().grad_sample_mode
    best = {}
    for key in {(r["model"], r["seq_len"]) for r in rows}:
        ok = [r for r in rows if (r["model"], r["seq_len"]) == key
              and r["mode"] != "no DP" and r["correct"]]
        if ok:
            best[f"{key[0]} @ {key[1]}"] = min(ok, key=lambda r: r["step_s"])["mode"]
    path = write(args.out, f"dp_overhead{'-quick' if args.quick else ''}"
                 f"{'-' + dev.type if dev.type != 'cpu' else ''}", {
                     "device": device(args.device), "quick": args.quick,
                     "timed_steps": steps, "default_mode": default,
                     "fastest_correct_mode": best, "results": rows})
    print(table(["model", "seq", "mode", "step s", "DP / no DP", "correct", "error"],
                [[r["model"], r["seq_len"], r["mode"], r["step_s"] or "-",
                  r["ratio"] or "-", r["correct"], r["error"][:40]] for r in rows]))
    print(f"fedtune's default mode: {default}; fastest correct: {best}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
