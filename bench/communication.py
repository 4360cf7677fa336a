"""Communication: bytes a site sends per round / the full model's bytes.

    python bench/communication.py [--quick] [--out DIR]

For the two default models (all-MiniLM-L6-v2 + LoRA r=8 with its head, and
SmolLM2-135M + LoRA r=8 on q/v), builds the model and encodes what a site sends
with fedtune's own code (``exchanged_state`` + ``updates.encode``, packed into the
Flower ``ArrayRecord``), for: fp32 adapters, FFA-LoRA (B and head only), fp16 and
int8 deltas, FFA + int8, and a rank-2 site of a heterogeneous-rank run. "Payload" is
the tensor bytes; "wire" is Flower's serialized record (tensor bytes + per-array
headers). The full model is every parameter of base + head, in the dtype it is held
in: what full fine-tuning with FedAvg would send. ``--quick`` is the same (it takes
seconds); the flag exists for ``bench/run_all``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import numpy as np
from harness import MODELS, RESULTS, device, table, write

VARIANTS: dict[str, tuple[dict[str, Any], str, int]] = {
    # name: (lora overrides, compression, site rank (0 = lora.r))
    "fp32 adapter": ({}, "none", 0),
    "FFA-LoRA": ({"ffa": True}, "none", 0),
    "fp16 delta": ({}, "fp16", 0),
    "int8 delta": ({}, "int8", 0),
    "FFA + int8": ({"ffa": True}, "int8", 0),
    "rank-2 site (of r=8)": ({}, "none", 2),
}


def sent(raw: dict[str, Any], lora: dict[str, Any], compression: str,
         rank: int) -> tuple[int, int, int]:
    """(payload bytes, wire bytes, full-model bytes) of one site's reply."""
    from fedtune.common import config, records, updates
    from fedtune.common.model import build_model, exchanged_state

    cfg = config.from_dict(raw)
    cfg = replace(cfg, lora=replace(cfg.lora, **lora))
    labels = 3 if cfg.model.task == "classification" else 0
    model = build_model(cfg.model, cfg.lora, num_labels=labels, seed=0, rank=rank)
    full = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if "lora_" not in n)
    state = {k: v.numpy() for k, v in exchanged_state(model, cfg.lora).items()}
    rng = np.random.default_rng(0)  # a trained adapter: the global one + a step
    trained = {k: v + rng.normal(0, 1e-3, v.shape).astype(v.dtype)
               for k, v in state.items()}
    out = updates.encode(trained, state, compression)
    import torch

    rec = records.to_record({k: torch.from_numpy(np.ascontiguousarray(v))
                             for k, v in out.items()})
    return records.payload_bytes(rec), records.wire_bytes(rec), full


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    rows = []
    for name, raw in MODELS.items():
        base = None
        for variant, (lora, comp, rank) in VARIANTS.items():
            payload, wire, full = sent(raw, lora, comp, rank)
            base = base or payload
            rows.append({"model": name, "variant": variant, "payload_bytes": payload,
                         "wire_bytes": wire, "full_model_bytes": full,
                         "payload_over_full_model": payload / full,
                         "vs_fp32_adapter": payload / base})
    path = write(args.out, "communication" + ("-quick" if args.quick else ""), {
        "device": device(), "what": "one site's reply per round", "results": rows})
    print(table(["model", "variant", "payload B", "wire B", "full model B",
                 "payload / full", "vs fp32"],
                [[r["model"], r["variant"], r["payload_bytes"], r["wire_bytes"],
                  r["full_model_bytes"], f"{100 * r['payload_over_full_model']:.3f} %",
                  r["vs_fp32_adapter"]] for r in rows]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
