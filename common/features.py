"""The classification head's input, computed once: each record's pooled encoder
output, cached while the encoder (the base model + LoRA) does not change.

Head-only rounds freeze LoRA, so the encoder a site trains on and the one the
server scores are the same from round to round: one forward pass per record serves
every epoch, round and evaluation. Under DP nothing changes: each record's gradient
on the head, and so its clipping and noise, is exactly what the whole model gives.
Pure torch + peft (no Flower, no Opacus): the site and the server both use it.

With ``lora.top_layers`` the same cache holds each record's hidden states
entering the first LoRA layer (:func:`hidden_inputs`): the layers below hold no
adapter, so those states never change, and the pooled features are computed from
them through the top layers alone.

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
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from fedtune.common.adapters import is_adapter
from fedtune.common.data import EncodedDataset, collate
from fedtune.common.loops import forward, to_device
from fedtune.common.model import adapter_state, classifier_head
from fedtune.common.toplayers import Captured, TopLayers, layer_input_hook, layer_of

FEATURES = "features"  # a cached record's key (the collated batch's too)
HIDDEN = "hidden"  # a record's cached hidden states (lora.top_layers)


class HeadOnly(nn.Module):
    """The linear head alone, fed the cached pooled features."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(features.to(next(self.head.parameters()).dtype))
        return out


# (id(dataset), what) -> (the dataset itself, kept alive so its id is never
# reused; the LoRA state the entry was computed with; the cached data set; its bytes)
_FEATURES: OrderedDict[tuple[int, str], tuple[EncodedDataset, dict[str, torch.Tensor],
                                              EncodedDataset, int]] = OrderedDict()
# kept per process: a simulation actor serves many sites (train + validation each),
# so the bound is the features' memory, not a count (384 floats per record for
# all-MiniLM-L6-v2: 1 GiB holds ~700 k records; a record's hidden states for
# lora.top_layers take its length times that)
_FEATURE_BYTES = 1 << 30
_STATS = {"computed": 0, "reused": 0, "shared": 0}
SHARED_ENV = "FEDTUNE_SHARED_FEATURES"


def _same_encoder(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """LoRA states equal up to float32 rounding (a server optimizer stepping in
    float64 may move a frozen tensor by a few ulps)."""
    return a.keys() == b.keys() and all(
        torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-8) for k in a)


def _cached(dataset: EncodedDataset, *, what: str, lora: dict[str, torch.Tensor],
            device: torch.device, compute: Callable[[], list[torch.Tensor]],
            build: Callable[[list[torch.Tensor]], EncodedDataset]) -> EncodedDataset:
    """``build(compute())``, from this process' memory, the simulation's shared
    directory, or computed (and then kept in both)."""
    key = (id(dataset), what)
    cached = _FEATURES.get(key)
    if cached is not None and _same_encoder(cached[1], lora):
        _FEATURES.move_to_end(key)
        _STATS["reused"] += 1
        return cached[2]
    shared = _shared_path(dataset, lora, device, what)
    if shared is not None and shared.is_file():  # another process computed them
        rows: list[torch.Tensor] = torch.load(shared, weights_only=True)
        _STATS["shared"] += 1
    else:
        rows = compute()
        _STATS["computed"] += 1
        if shared is not None:  # for the other processes of this simulation
            tmp = shared.with_suffix(f".{os.getpid()}.tmp")
            torch.save(rows, tmp)
            os.replace(tmp, shared)
    out = build(rows)
    _FEATURES[key] = (dataset, lora, out, sum(r.nbytes for r in rows))
    while len(_FEATURES) > 1 and sum(
            e[3] for e in _FEATURES.values()) > _FEATURE_BYTES:
        _FEATURES.popitem(last=False)
    return out


@torch.no_grad()
def head_features(model: nn.Module, dataset: EncodedDataset, *, device: torch.device,
                  pad_id: int, batch_size: int, top_layers: int = 0) -> EncodedDataset:
    """The head's input for every record of ``dataset`` (with its label), cached
    per data set and LoRA state; see the module docstring. ``top_layers`` (LoRA
    on the top k layers only): computed by those layers from the cached hidden
    states entering them (:func:`hidden_inputs`), not by the whole encoder."""
    wrapper, _ = classifier_head(model)
    lora = {k: v for k, v in adapter_state(model).items() if is_adapter(k)}

    def compute() -> list[torch.Tensor]:
        net, source = model, dataset
        if top_layers:
            net = TopLayers(model, top_layers)
            source = hidden_inputs(model, dataset, layer=net.first, device=device,
                                   pad_id=pad_id, batch_size=batch_size)
        captured: list[torch.Tensor] = []
        hook = wrapper.register_forward_hook(
            lambda _m, args, _out: captured.append(args[0].detach().float().cpu()))
        try:
            for _ in _forward_sorted(net, source, device=device, pad_id=pad_id,
                                     batch_size=batch_size):
                pass
        finally:
            hook.remove()
        return _in_order(list(torch.cat(captured)) if captured else [], dataset)

    return _cached(dataset, what="pooled", lora=lora, device=device,
                   compute=compute, build=lambda rows: EncodedDataset([
                       {FEATURES: f, "labels": item["labels"]}
                       for f, item in zip(rows, dataset.items, strict=True)]))


@torch.no_grad()
def hidden_inputs(model: nn.Module, dataset: EncodedDataset, *, layer: int,
                  device: torch.device, pad_id: int, batch_size: int
                  ) -> EncodedDataset:
    """Each record's hidden states entering transformer layer ``layer`` (its own
    length, fp32) beside its tokens and label or loss mask: the input of
    :class:`fedtune.common.toplayers.TopLayers`. Cached per data set, layer and
    the LoRA tensors below ``layer`` (none under ``lora.top_layers``)."""
    lora = {k: v for k, v in adapter_state(model).items()
            if is_adapter(k) and (layer_of(k) or 0) < layer}

    def compute() -> list[torch.Tensor]:
        rows: list[torch.Tensor] = []
        hook, captured = layer_input_hook(model, layer)
        try:
            for mask in _forward_sorted(model, dataset, device=device, pad_id=pad_id,
                                        batch_size=batch_size, stop=Captured):
                states = captured.pop().float().cpu()
                rows += [s[: int(n)].clone() for s, n in zip(
                    states, mask.sum(1).tolist(), strict=True)]
        finally:
            hook.remove()
        return _in_order(rows, dataset)

    return _cached(dataset, what=f"layer-{layer}", lora=lora, device=device,
                   compute=compute, build=lambda rows: EncodedDataset([
                       {**item, HIDDEN: h}
                       for h, item in zip(rows, dataset.items, strict=True)]))


def _order(dataset: EncodedDataset) -> list[int]:
    # shortest records first: a batch pads to its longest record, so batches of
    # similar lengths spend the encoder's time on tokens, not padding
    return sorted(range(len(dataset)), key=lambda i: len(dataset.items[i]["input_ids"]))


def _forward_sorted(model: nn.Module, dataset: EncodedDataset, *,
                    device: torch.device, pad_id: int, batch_size: int,
                    stop: type[Exception] | None = None) -> Iterator[torch.Tensor]:
    """Run the model in eval mode over ``dataset`` in length-sorted batches
    (:func:`_order`), yielding each batch's attention mask after its forward pass
    (a hook raising ``stop`` ends a pass early)."""
    was_training = model.training
    model.eval()
    try:
        loader = DataLoader(Subset(dataset, _order(dataset)), batch_size=batch_size,
                            collate_fn=functools.partial(collate, pad_id=pad_id))
        for batch in loader:
            try:
                forward(model, to_device(batch, device))
            except Exception as err:
                if stop is None or not isinstance(err, stop):
                    raise
            yield batch["attention_mask"]
    finally:
        model.train(was_training)


def _in_order(rows: list[torch.Tensor], dataset: EncodedDataset) -> list[torch.Tensor]:
    """Rows computed in :func:`_order` back in the records' order (a data set of
    cached hidden states has its records' lengths, and so the same order)."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    for row, i in zip(rows, _order(dataset), strict=True):
        out[i] = row
    return out


def _shared_path(dataset: EncodedDataset, lora: dict[str, torch.Tensor],
                 device: torch.device, what: str) -> Path | None:
    """Where the processes of one simulation share a data set's features
    (``FEDTUNE_SHARED_FEATURES``, a directory the simulation driver makes and
    removes; unset, as on a deployed site: memory only). Keyed by the records'
    tokens and labels (a causal LM's: loss masks), the LoRA state (at fp16
    precision, so a few ulps of server optimizer drift share the entry) and the
    device."""
    root = os.environ.get(SHARED_ENV)
    if not root or not os.path.isdir(root):  # a cluster's other machines: memory
        return None
    h = hashlib.sha256(f"{device.type}:{what}".encode())
    for item in dataset.items:
        h.update(item["input_ids"].numpy().tobytes())
        h.update(item["labels" if "labels" in item else "loss_mask"]
                 .numpy().tobytes())  # a causal LM's records carry a loss mask
    for k in sorted(lora):
        h.update(k.encode())
        h.update(lora[k].detach().to(torch.float16).cpu().numpy().tobytes())
    return Path(root) / f"{h.hexdigest()[:32]}.pt"


def cache_counts() -> dict[str, int]:
    """How often this process computed features, reused its own cached ones and
    read ones another process of the simulation computed."""
    return dict(_STATS)
