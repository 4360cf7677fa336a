"""The classification head's input, computed once: each record's pooled encoder
output, cached while the encoder (the base model + LoRA) does not change.

Head-only rounds freeze LoRA, so the encoder a site trains on and the one the
server scores are the same from round to round: one forward pass per record serves
every epoch, round and evaluation. Under DP nothing changes: each record's gradient
on the head, and so its clipping and noise, is exactly what the whole model gives.
Pure torch + peft (no Flower, no Opacus): the site and the server both use it.

A process keeps the features it computed in memory (up to 1 GiB). A simulation's
actors serve whichever sites Flower hands them, so the driver also gives them one
temporary directory to share features through (:func:`_shared_path`); it is
removed when the simulation ends. A deployed site computes and keeps its own.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from fedtune.common.data import EncodedDataset, collate
from fedtune.common.model import adapter_state, classifier_head, is_lora

FEATURES = "features"  # a cached record's key (the collated batch's too)


class HeadOnly(nn.Module):
    """The linear head alone, fed the cached pooled features."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(features.to(next(self.head.parameters()).dtype))
        return out


# id(dataset) -> (the dataset itself, kept alive so its id is never reused; the
# LoRA state the features were computed with; the features; their bytes)
_FEATURES: OrderedDict[int, tuple[EncodedDataset, dict[str, torch.Tensor],
                                  EncodedDataset, int]] = OrderedDict()
# kept per process: a simulation actor serves many sites (train + validation each),
# so the bound is the features' memory, not a count (384 floats per record for
# all-MiniLM-L6-v2: 1 GiB holds ~700 k records)
_FEATURE_BYTES = 1 << 30
_STATS = {"computed": 0, "reused": 0, "shared": 0}
SHARED_ENV = "FEDTUNE_SHARED_FEATURES"


def _same_encoder(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """LoRA states equal up to float32 rounding (a server optimizer stepping in
    float64 may move a frozen tensor by a few ulps)."""
    return a.keys() == b.keys() and all(
        torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-8) for k in a)


@torch.no_grad()
def head_features(model: nn.Module, dataset: EncodedDataset, *, device: torch.device,
                  pad_id: int, batch_size: int) -> EncodedDataset:
    """The head's input for every record of ``dataset`` (with its label), cached
    per data set and LoRA state; see the module docstring."""
    lora = {k: v for k, v in adapter_state(model).items() if is_lora(k)}
    cached = _FEATURES.get(id(dataset))
    if cached is not None and _same_encoder(cached[1], lora):
        _FEATURES.move_to_end(id(dataset))
        _STATS["reused"] += 1
        return cached[2]
    shared = _shared_path(dataset, lora, device)
    if shared is not None and shared.is_file():  # another process computed them
        feats = torch.load(shared, weights_only=True)
        _STATS["shared"] += 1
    else:
        feats = _encode(model, dataset, device=device, pad_id=pad_id,
                        batch_size=batch_size)
        _STATS["computed"] += 1
        if shared is not None:  # for the other processes of this simulation
            tmp = shared.with_suffix(f".{os.getpid()}.tmp")
            torch.save(feats, tmp)
            os.replace(tmp, shared)
    out = EncodedDataset([{FEATURES: f, "labels": item["labels"]}
                          for f, item in zip(feats, dataset.items, strict=True)])
    _FEATURES[id(dataset)] = (dataset, lora, out, feats.nbytes)
    while len(_FEATURES) > 1 and sum(
            e[3] for e in _FEATURES.values()) > _FEATURE_BYTES:
        _FEATURES.popitem(last=False)
    return out


def _encode(model: nn.Module, dataset: EncodedDataset, *, device: torch.device,
            pad_id: int, batch_size: int) -> torch.Tensor:
    """The pooled encoder output of every record, in the records' order."""
    wrapper, _ = classifier_head(model)
    captured: list[torch.Tensor] = []
    hook = wrapper.register_forward_hook(
        lambda _m, args, _out: captured.append(args[0].detach().float().cpu()))
    was_training = model.training
    model.eval()
    # shortest records first: a batch pads to its longest record, so batches of
    # similar lengths spend the encoder's time on tokens, not padding
    order = sorted(range(len(dataset)),
                   key=lambda i: len(dataset.items[i]["input_ids"]))
    try:
        loader = DataLoader(Subset(dataset, order), batch_size=batch_size,
                            collate_fn=functools.partial(collate, pad_id=pad_id))
        for batch in loader:
            model(input_ids=batch["input_ids"].to(device),
                  attention_mask=batch["attention_mask"].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    if not captured:
        return torch.zeros((0, 1))
    feats = torch.empty_like(sorted_feats := torch.cat(captured))
    feats[torch.tensor(order)] = sorted_feats  # back to the records' order
    return feats


def _shared_path(dataset: EncodedDataset, lora: dict[str, torch.Tensor],
                 device: torch.device) -> Path | None:
    """Where the processes of one simulation share a data set's features
    (``FEDTUNE_SHARED_FEATURES``, a directory the simulation driver makes and
    removes; unset, as on a deployed site: memory only). Keyed by the records'
    tokens and labels, the LoRA state (at fp16 precision, so a few ulps of server
    optimizer drift share the entry) and the device."""
    root = os.environ.get(SHARED_ENV)
    if not root:
        return None
    h = hashlib.sha256(str(device.type).encode())
    for item in dataset.items:
        h.update(item["input_ids"].numpy().tobytes())
        h.update(item["labels"].numpy().tobytes())
    for k in sorted(lora):
        h.update(k.encode())
        h.update(lora[k].detach().to(torch.float16).cpu().numpy().tobytes())
    return Path(root) / f"{h.hexdigest()[:32]}.pt"


def cache_counts() -> dict[str, int]:
    """How often this process computed features, reused its own cached ones and
    read ones another process of the simulation computed."""
    return dict(_STATS)
