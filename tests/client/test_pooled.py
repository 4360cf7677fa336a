"""A site's share under distributed noise: the clipped-gradient sum is exactly the
per-record computation, and the share lies on SecAgg+'s grid in the adapter's
names (frozen tensors exact zeros)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.client import pooled
from fedtune.common import config, data, loops, planning
from fedtune.common import model as M
from tests.conftest import REVIEW_DATA, make_reviews, tiny_config

CPU = torch.device("cpu")


def _cfg(tiny_bert: Path, review_files: tuple[Path, Path]) -> config.RunConfig:
    return config.from_dict(tiny_config(
        tiny_bert, *review_files,
        privacy={"noise": "distributed", "max_grad_norm": 0.5},
        federation={"secure_aggregation": True, "secagg_threshold": 2,
                    "secagg_clipping_range": 256.0}))


def _setup(tiny_bert: Path) -> tuple[torch.nn.Module, data.EncodedDataset]:
    tok = M.load_tokenizer(str(tiny_bert))
    recs = make_reviews(20, 0)
    ds = data.encode_classification(recs, tok, cfg=config.DataConfig(
        max_length=32, **REVIEW_DATA))
    model = M.build_model(config.ModelConfig(name_or_path=str(tiny_bert)),
                          config.LoraConfig(r=4), num_labels=3)
    return model, ds


def _manual(model: torch.nn.Module, ds: data.EncodedDataset, clip: float,
            weights: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each record's gradient by autograd alone, clipped, weighed, summed."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(ds)):
        batch = data.collate([ds[i]], pad_id=0)
        loss = loops.per_sample_loss(model, batch, task="classification").sum()
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6)) * float(
            weights[int(batch["labels"][0])])
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return {id(p): t for p, t in zip(params, total, strict=True)}


def test_clipped_sum_is_the_per_record_computation(
        tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    cfg = _cfg(tiny_bert, review_files)
    model, ds = _setup(tiny_bert)
    model.train()
    weights = torch.tensor([1.0, 0.5, 0.25])
    want = _manual(model, ds, 0.5, weights)
    got, loss = pooled.clipped_sum(model, ds, cfg=cfg, device=CPU, pad_id=0,
                                   class_weights=weights)
    assert set(got) == set(want) and loss > 0
    for key, value in want.items():
        assert torch.allclose(got[key], value, atol=1e-5), key
    assert not any(getattr(p, "grad_sample", None) is not None
                   for p in model.parameters())  # Opacus' hooks removed


@pytest.mark.parametrize("head_only", [True, False])
def test_a_share_lies_on_the_grid_in_the_adapters_names(
        tiny_bert: Path, review_files: tuple[Path, Path], head_only: bool) -> None:
    cfg = _cfg(tiny_bert, review_files)
    model, ds = _setup(tiny_bert)
    M.set_adapter_trainable(model, cfg.lora, trainable=not head_only)
    got = pooled.share(model, ds, cfg=cfg, sigma=2.0, head_only=head_only,
                       device=CPU, pad_id=0, seed=0)
    state = M.adapter_state(model)
    assert sorted(got.arrays) == sorted(state)
    mech = planning.mechanism(cfg, sigma=2.0, dims=got.dims)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert got.dims == trained and got.sigma == 2.0 and got.records == 20
    for name, value in got.arrays.items():
        assert value.dtype == torch.float64 and value.shape == state[name].shape
        levels = value.numpy() / mech.grid.step
        assert np.array_equal(levels, np.rint(levels))
        if head_only and M.is_adapter(name):
            assert not value.any()  # frozen: exact zeros, no noise
        else:
            assert value.std() > 0.5 * mech.share_sigma * mech.grid.step
