"""The classification head's input, computed once: each record's pooled encoder
output, cached while the encoder (the base model + LoRA) does not change.

Head-only rounds freeze LoRA, so the encoder a site trains on and the one the
server scores are the same from round to round: one forward pass per record serves
every epoch, round and evaluation. Under DP nothing changes: each record's gradient
on the head, and so its clipping and noise, is exactly what the whole model gives.
Pure torch + peft (no Flower, no Opacus): the site and the server both use it.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from torch import nn
from torch.utils.data import DataLoader

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
# LoRA state the features were computed with; the features)
_FEATURES: OrderedDict[int, tuple[EncodedDataset, dict[str, torch.Tensor],
                                  EncodedDataset]] = OrderedDict()
_FEATURE_CACHE = 16  # data sets kept per process
_STATS = {"computed": 0, "reused": 0}


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
    wrapper, _ = classifier_head(model)
    captured: list[torch.Tensor] = []
    hook = wrapper.register_forward_hook(
        lambda _m, args, _out: captured.append(args[0].detach().float().cpu()))
    was_training = model.training
    model.eval()
    try:
        loader = DataLoader(dataset, batch_size=batch_size,
                            collate_fn=functools.partial(collate, pad_id=pad_id))
        for batch in loader:
            model(input_ids=batch["input_ids"].to(device),
                  attention_mask=batch["attention_mask"].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    feats = torch.cat(captured) if captured else torch.zeros((0, 1))
    out = EncodedDataset([{FEATURES: f, "labels": item["labels"]}
                          for f, item in zip(feats, dataset.items, strict=True)])
    _FEATURES[id(dataset)] = (dataset, lora, out)
    _STATS["computed"] += 1
    while len(_FEATURES) > _FEATURE_CACHE:
        _FEATURES.popitem(last=False)
    return out


def cache_counts() -> dict[str, int]:
    """How often this process computed features and reused cached ones."""
    return dict(_STATS)
