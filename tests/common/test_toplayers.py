"""LoRA on the top k layers trained on cached hidden states equals the whole model:
the same per-record gradients, so the same clipping and the same DP noise."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedtune.client import trainer
from fedtune.common import adapters, data, features, loops, toplayers
from fedtune.common import model as M
from fedtune.common.config import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
    from_dict,
)
from fedtune.common.errors import ConfigError, ModelError
from tests.conftest import REVIEW_DATA, make_reviews

CPU = torch.device("cpu")
LABELS = 3


def _classifier(tiny_bert: Path, k: int) -> nn.Module:
    model = M.build_model(ModelConfig(name_or_path=str(tiny_bert)),
                          LoraConfig(r=4, top_layers=k), num_labels=LABELS, seed=3)
    return _perturbed(model)


def _perturbed(model: nn.Module) -> nn.Module:
    """B = 0 at init: move every trainable tensor so LoRA's gradient is not trivial."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _records(tiny_bert: Path, n: int) -> data.EncodedDataset:
    tok = M.load_tokenizer(str(tiny_bert))
    recs = [{**r, "review": " ".join(r["review"].split()[: 3 + i % 5])}  # lengths vary
            for i, r in enumerate(make_reviews(n, 1))]
    return data.encode_classification(recs, tok,
                                      cfg=DataConfig(max_length=32, **REVIEW_DATA))


def _grad_samples(net: nn.Module, batch: dict[str, torch.Tensor], task: str,
                  names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Opacus' per-record gradients (what DP-SGD clips) of ``net`` on ``batch``."""
    gsm = GradSampleModule(net)
    try:
        loss = loops.per_sample_loss(gsm, batch, task=task).sum()
        loss.backward()
        out = {names[id(p)]: p.grad_sample.detach().clone()  # type: ignore[attr-defined]
               for p in net.parameters() if p.requires_grad}
    finally:
        gsm._close()
    for p in net.parameters():
        p.grad, p.grad_sample = None, None  # type: ignore[attr-defined]
    return out


def test_lora_sits_on_the_top_layers_only(tiny_bert: Path) -> None:
    model = _classifier(tiny_bert, 1)
    lora = [n for n, _ in model.named_parameters() if adapters.is_adapter(n)]
    assert lora and all(toplayers.layer_of(n) == 1 for n in lora)  # 2 layers: the top


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_cached_top_layers_give_the_full_models_per_record_gradients(
        task: str, tiny_bert: Path, tiny_llama: Path, sft_file: Path) -> None:
    # Prepare: a model whose top layer alone carries LoRA, and a padded batch
    if task == "classification":
        model, ds = _classifier(tiny_bert, 1), _records(tiny_bert, 12)
    else:
        model = _perturbed(M.build_model(
            ModelConfig(name_or_path=str(tiny_llama), task="causal-lm"),
            LoraConfig(r=4, top_layers=1), seed=3))
        tok = M.load_tokenizer(str(tiny_llama))
        recs = [{**r, "prompt": " ".join(r["prompt"].split()[: 2 + i % 6])}
                for i, r in enumerate(data.read_records(
                    str(sft_file), required=["prompt", "response"]))]
        ds = data.encode_for_task(recs[:12], tok, task=task,
                                  cfg=DataConfig(max_length=48), source="sft")
    model.train()  # Opacus records activations in training mode (no dropout here)
    names = {id(p): n for n, p in model.named_parameters()}
    collate = functools.partial(data.collate, pad_id=0)
    full_batch = collate(list(ds.items))
    assert full_batch["attention_mask"].min() == 0  # records of different lengths
    # Execute: the whole model, then the top layer on the cached hidden states
    full = _grad_samples(model, full_batch, task, names)
    top = toplayers.TopLayers(model, 1)
    cached = features.hidden_inputs(model, ds, layer=top.first, device=CPU,
                                    pad_id=0, batch_size=5)
    cut = _grad_samples(top, collate(list(cached.items)), task, names)
    # Assert: every trainable tensor, every record, within 1e-5
    assert full.keys() == cut.keys() and any(adapters.is_adapter(k) for k in full)
    for name in full:
        assert full[name].shape[0] == len(ds)
        torch.testing.assert_close(cut[name], full[name], rtol=1e-5, atol=1e-5,
                                   msg=name)
    assert max(float(v.abs().max()) for v in full.values()) > 1e-3  # not all zero


def test_dp_training_on_cached_layers_moves_lora_and_reuses_the_cache(
        tiny_bert: Path) -> None:
    train_set, val_set = _records(tiny_bert, 64), _records(tiny_bert, 16)
    model = _classifier(tiny_bert, 1)
    before = {k: v for k, v in M.adapter_state(model).items() if adapters.is_adapter(k)}
    counts = features.cache_counts()
    res = trainer.train_local(
        model, train_set, val_set, task="classification",
        train_cfg=TrainConfig(local_epochs=2, batch_size=16, learning_rate=1e-2),
        privacy_cfg=PrivacyConfig(secure_noise=False), noise_multiplier=1.0,
        device=CPU, pad_id=0, seed=0, top_layers=1)
    after = M.adapter_state(model)
    assert res.steps > 0 and res.val_loss == res.val_loss
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert features.cache_counts()["computed"] == counts["computed"] + 2  # train, val
    trainer.train_local(
        model, train_set, val_set, task="classification",
        train_cfg=TrainConfig(local_epochs=1, batch_size=16), privacy_cfg=PrivacyConfig(
            secure_noise=False), noise_multiplier=1.0, device=CPU, pad_id=0, seed=1,
        top_layers=1)  # the next round: the same cached states
    assert features.cache_counts()["computed"] == counts["computed"] + 2


def test_a_model_with_lora_below_the_top_layers_is_refused(tiny_bert: Path) -> None:
    model = _classifier(tiny_bert, 0)  # LoRA on both layers
    with pytest.raises(ValueError, match="leaves trainable tensors below"):
        trainer.train_local(
            model, _records(tiny_bert, 16), _records(tiny_bert, 4),
            task="classification", train_cfg=TrainConfig(batch_size=8),
            privacy_cfg=PrivacyConfig(enabled=False), noise_multiplier=0.0,
            device=CPU, pad_id=0, seed=0, top_layers=1)


def test_more_top_layers_than_the_model_has_are_refused(tiny_bert: Path) -> None:
    with pytest.raises(ModelError, match=r"top_layers: 3 is more than the model's 2 "
                                         r"layers; use 1\.\.2"):
        _classifier(tiny_bert, 3)
    with pytest.raises(ConfigError, match="top_layers: must be >= 0"):
        from_dict({"lora": {"top_layers": -1}})
