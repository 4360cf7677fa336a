"""DP step time of LoRA on the top k layers, with and without the cached frozen
layers (``lora.top_layers``), against LoRA on every layer.

    python bench/top_layers.py [--quick] [--device cpu|cuda] [--steps 6]
                               [--batch 64] [--out DIR]

For each default model (all-MiniLM-L6-v2 + head on ICD-10 descriptions, and
SmolLM2-135M-Instruct on the drug-review SFT prompts) and k = 1, 2 and all layers,
one DP-SGD step (fedtune's ``trainer.train_step``: Opacus per-sample gradients,
clipping, noise, AdamW) on the same real records:

- *no cache*: LoRA on the top k layers, the batch through the whole model;
- *cached*: the hidden states entering layer L - k computed once
  (``features.hidden_inputs``, its one-off cost per record reported), the step
  through the top k layers only (``toplayers.TopLayers``).

Each row also gives the records per second and the trainable dimensions (what DP
noises). Both paths compute the same per-record gradients
(tests/common/test_toplayers.py); this script measures only their time.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any

import torch
from harness import MODELS, RESULTS, device, sync, table, write

DATA = {  # real records for each model's task
    "classification": {"source": "fedtune:icd10-chapters", "text_column": "text",
                       "label_column": "chapter"},
    "causal-lm": {"source": "fedtune:drug-review-sft"},
}


def _records(raw: dict[str, Any], n: int) -> Any:
    from fedtune.common import data
    from fedtune.common.config import from_dict
    from fedtune.common.model import load_tokenizer

    task = raw["model"]["task"]
    cfg = from_dict({**raw, "data": {**DATA[task], **(
        {} if task == "classification" else {"labels": []})}})
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.gguf_file)
    recs = data.read_records(cfg.data.source,
                             required=data.required_columns(task, cfg.data))[:n]
    return cfg, data.encode_for_task(recs, tok, task=task, cfg=cfg.data,
                                     source=cfg.data.source), int(tok.pad_token_id)


def run(cfg: Any, ds: Any, *, pad: int, k: int, cached: bool, steps: int,
        batch: int, dev: torch.device) -> dict[str, Any]:
    """Median seconds of one DP step (after one warm-up) for one arm."""
    from dataclasses import replace

    from fedtune.client import dpsgd, trainer
    from fedtune.common import data, features, toplayers
    from fedtune.common.model import build_model

    labels = len(cfg.data.labels) if cfg.model.task == "classification" else 0
    lora = replace(cfg.lora, top_layers=k)
    model = build_model(cfg.model, lora, num_labels=labels, seed=0).to(dev)
    model.train()
    net: torch.nn.Module = model
    cache_s = 0.0
    source = ds
    if cached:
        net = toplayers.TopLayers(model, k)
        t0 = time.perf_counter()
        source = features.hidden_inputs(model, ds, layer=net.first, device=dev,
                                        pad_id=pad, batch_size=64)
        cache_s = time.perf_counter() - t0
    params = [p for p in net.parameters() if p.requires_grad]
    train_cfg = replace(cfg.train, batch_size=batch)
    opt = trainer.make_optimizer(params, train_cfg)
    gsm, opt = dpsgd.make_private(net, opt, cfg=cfg.privacy, noise_multiplier=1.0,
                                  expected_batch_size=batch)
    col = functools.partial(data.collate, pad_id=pad)
    batches = [col([source[(i * batch + j) % len(source)] for j in range(batch)])
               for i in range(steps + 1)]
    times = []
    try:
        for i, b in enumerate(batches):
            sync(dev)
            t0 = time.perf_counter()
            trainer.train_step(gsm, opt, {key: v.to(dev) for key, v in b.items()},
                               task=cfg.model.task, dp=True, cfg=train_cfg,
                               device=dev, params=params)
            sync(dev)
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
    finally:
        gsm._close()  # type: ignore[operator]  # Opacus' hooks
    step = statistics.median(times)
    return {"k": k, "cached": cached, "step_s": step, "records_per_s": batch / step,
            "cache_s_per_record": cache_s / len(ds) if cached else None,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="2 timed steps, batch 8, MiniLM only (a smoke run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    dev = torch.device(args.device)
    steps, batch = (2, 8) if args.quick else (args.steps, args.batch)
    from fedtune.common.model import num_layers

    rows = []
    for name, raw in list(MODELS.items())[: 1 if args.quick else None]:
        b = batch if raw["model"]["task"] == "classification" else max(1, batch // 8)
        cfg, ds, pad = _records(raw, 8 * b)
        from fedtune.common.model import load_pretrained

        count = num_layers(load_pretrained(cfg.model).config)
        for k in (1, 2, count):
            for cached in (False, True):
                row = {"model": name, "layers": count, "batch": b,
                       **run(cfg, ds, pad=pad, k=k, cached=cached, steps=steps,
                             batch=b, dev=dev)}
                rows.append(row)
                print(f"{name} k={k} cached={cached}: {row['step_s']:.3f} s",
                      flush=True)
    for r in rows:  # against today's default LoRA: every layer, no cache
        ref = next(x for x in rows if x["model"] == r["model"]
                   and x["k"] == x["layers"] and not x["cached"])
        r["speedup_vs_all_layers"] = ref["step_s"] / r["step_s"]
    path = write(args.out, f"top_layers{'-quick' if args.quick else ''}"
                 f"{'-' + dev.type if dev.type != 'cpu' else ''}", {
                     "device": device(args.device), "quick": args.quick,
                     "timed_steps": steps, "results": rows})
    print(table(["model", "k", "cached", "batch", "step s", "records/s",
                 "x all layers", "cache s/record", "trainable"],
                [[r["model"], r["k"], "yes" if r["cached"] else "no", r["batch"],
                  r["step_s"], r["records_per_s"], r["speedup_vs_all_layers"],
                  r["cache_s_per_record"] or "-", r["trainable"]] for r in rows]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
