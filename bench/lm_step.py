"""A causal LM's DP step, in records per second: the LM head at every position
(before) against the head at the loss positions only (after), per PEFT method.

    python bench/lm_step.py [--batch 32] [--steps 5] [--records 256] [--out DIR]

SmolLM2-135M-Instruct (the offline default causal LM) on the instruct scenario's
prompts (``fedtune:icd10-instruct``: an ICD-10 description in, its chapter out),
batch ``--batch``, in fp32 on this machine's CPU (or ``--device cuda``). A step is
what DP-SGD computes before clipping: each record's loss, the backward pass and
Opacus' per-record gradients (``fedtune.client.dpsgd.wrap``). Rows:

- ``encode``: the frozen forward pass that ``lora.top_layers`` caches once per
  record (the hidden states entering the top layer), records/s;
- ``lora top-1`` (cached): LoRA on the top layer, fed the cached states, before
  and after;
- ``lora``, ``ia3``, ``prompt``, ``prefix`` on the whole model (prompt and prefix
  tuning reach every layer, so nothing below can be cached), before and after.

"Before" is the loss as fedtune computed it until this bench: the head at every
position, then the response tokens' mean (kept here as ``full_logits_loss``);
"after" is ``fedtune.common.loops.per_sample_loss``. Both give the same per-record
gradients (tests/client/test_response_logits.py); the bench checks the losses
agree to 1e-4 and fails otherwise. Writes ``OUT/lm_step.json``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from harness import RESULTS, device, sync, table, write

MODEL = {"name_or_path": "fedtune:SmolLM2-135M-Instruct",
         "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "task": "causal-lm"}
METHODS = [("lora", 1), ("lora", 0), ("ia3", 0), ("prompt", 0), ("prefix", 0)]


def full_logits_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss before: logits at every position, the response tokens' mean."""
    from fedtune.common.loops import forward

    logits = forward(model, batch).logits
    logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1]:][:, :-1]
    target, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:]
    tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                          target.reshape(-1), reduction="none").view(target.shape)
    return (tok * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _records(n: int) -> Any:
    from fedtune.common import assets, data
    from fedtune.common.config import DataConfig
    from fedtune.common.model import load_tokenizer

    tok = load_tokenizer(MODEL["name_or_path"], MODEL["gguf_file"])
    recs = data.read_records(assets.resolve("fedtune:icd10-instruct"),
                             required=["prompt", "response"])[:n]
    return data.encode_for_task(recs, tok, task="causal-lm", cfg=DataConfig(),
                                source="instruct"), int(tok.pad_token_id)


def _time(fn: Any, steps: int, dev: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _step(loss_fn: Any, net: Any, batch: dict[str, torch.Tensor], model: Any,
          losses: dict[str, torch.Tensor], key: str) -> None:
    """One step's per-record losses, backward pass and per-record gradients."""
    loss = loss_fn(net, batch)
    losses[key] = loss.detach()
    loss.mean().backward()
    for q in model.parameters():
        q.grad, q.grad_sample = None, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    from fedtune.client import dpsgd
    from fedtune.common import data, features, loops
    from fedtune.common import model as M
    from fedtune.common.config import LoraConfig, ModelConfig
    from fedtune.common.toplayers import TopLayers

    torch.manual_seed(0)
    dev = torch.device(args.device)
    ds, pad = _records(args.records)
    lengths = [len(i["input_ids"]) for i in ds.items]
    read = [int(i["loss_mask"].sum()) for i in ds.items]
    rows: list[dict[str, Any]] = []
    for method, k in METHODS:
        model = M.build_model(ModelConfig(**MODEL), LoraConfig(  # type: ignore[arg-type]  # a Literal
            method=method, top_layers=k), seed=0).to(dev)
        model.train()
        items = ds.items[: args.batch]
        net: Any = model
        if k:
            top = TopLayers(model, k)
            t0 = time.perf_counter()
            cached = features.hidden_inputs(model, ds, layer=top.first, device=dev,
                                            pad_id=pad, batch_size=32)
            enc = time.perf_counter() - t0
            rows.append({"row": "encode", "method": "frozen pass", "top_layers": k,
                         "records_per_s": len(ds) / enc})
            items, net = cached.items[: args.batch], top
        batch = loops.to_device(data.collate(list(items), pad_id=pad), dev)
        gsm: Any = dpsgd.wrap(net, "hooks")
        out: dict[str, Any] = {"row": f"{method} top-{k}" if k else method,
                               "method": method, "top_layers": k}
        losses: dict[str, torch.Tensor] = {}
        for when, loss_fn in (("before", full_logits_loss),
                              ("after", lambda m, b: loops.per_sample_loss(
                                  m, b, task="causal-lm"))):
            step = functools.partial(_step, loss_fn, gsm, batch, model, losses, when)
            out[f"{when}_records_per_s"] = args.batch / _time(step, args.steps, dev)
        gsm._close()
        gap = float((losses["before"] - losses["after"]).abs().max())
        if gap > 1e-4:
            raise SystemExit(f"{out['row']}: the two losses differ by {gap}")
        out["speedup"] = out["after_records_per_s"] / out["before_records_per_s"]
        out["trainable"] = M.trainable_parameters(model)
        rows.append(out)
        print(out, flush=True)
    write(args.out, "lm_step", {
        "device": device(args.device), "model": MODEL["name_or_path"],
        "batch": args.batch, "records": len(ds),
        "tokens_per_record": statistics.fmean(lengths),
        "loss_tokens_per_record": statistics.fmean(read), "rows": rows})
    print(table(["row", "trainable", "before rec/s", "after rec/s", "speedup"],
                [[r["row"], r.get("trainable", "-"),
                  r.get("before_records_per_s", r.get("records_per_s")),
                  r.get("after_records_per_s", "-"), r.get("speedup", "-")]
                 for r in rows]))


if __name__ == "__main__":
    main()
