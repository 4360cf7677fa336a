from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedtune.client import trainer
from fedtune.common import data, loops
from fedtune.common import model as M
from fedtune.common.config import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
)
from fedtune.common.errors import ConfigError
from tests.conftest import REVIEW_DATA, make_reviews

CPU = torch.device("cpu")


def _sets(tiny_bert: Path, n: int = 96) -> tuple[data.EncodedDataset, ...]:
    tok = M.load_tokenizer(str(tiny_bert))
    cfg = DataConfig(max_length=32, **REVIEW_DATA)
    recs = make_reviews(n, 0)
    return (data.encode_classification(recs[: n - 24], tok, cfg=cfg),
            data.encode_classification(recs[n - 24:], tok, cfg=cfg))


def _model(tiny_bert: Path) -> torch.nn.Module:
    return M.build_model(ModelConfig(name_or_path=str(tiny_bert)), LoraConfig(r=4),
                         num_labels=3)


def test_non_private_training_learns(tiny_bert: Path) -> None:
    train_set, val_set = _sets(tiny_bert)
    model = _model(tiny_bert)
    before = loops.evaluate(model, val_set, task="classification", batch_size=32,
                              device=CPU, pad_id=0)
    res = trainer.train_local(
        model, train_set, val_set, task="classification",
        train_cfg=TrainConfig(local_epochs=8, batch_size=8, learning_rate=2e-2),
        privacy_cfg=PrivacyConfig(enabled=False), noise_multiplier=0.0, device=CPU,
        pad_id=0, seed=0)
    after = loops.evaluate(model, val_set, task="classification", batch_size=32,
                             device=CPU, pad_id=0, labels=["negative", "neutral",
                                                           "positive"])
    assert res.steps == 8 * 9 and res.num_examples == 72 and res.sample_rate == 0.0
    assert after["loss"] < before["loss"] - 0.2
    assert after["accuracy"] > 0.6
    assert {"macro-f1", "recall-negative", "recall-positive"} <= set(after)


def test_dp_training_counts_every_poisson_step_including_empty(tiny_bert: Path
                                                              ) -> None:
    train_set, val_set = _sets(tiny_bert)
    model = _model(tiny_bert)
    # batch 1 of 72 records: q = 1/72, many Poisson batches are empty
    res = trainer.train_local(
        model, train_set, val_set, task="classification",
        train_cfg=TrainConfig(max_steps=40, batch_size=1, learning_rate=1e-2),
        privacy_cfg=PrivacyConfig(max_grad_norm=1.0), noise_multiplier=1.0,
        device=CPU, pad_id=0, seed=0)
    assert res.steps == 40
    assert res.sample_rate == pytest.approx(1 / 72)
    assert math.isfinite(res.train_loss) and math.isfinite(res.val_loss)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None
                   for p in model.parameters())  # Opacus hooks removed


def test_early_stopping_restores_best(tiny_bert: Path) -> None:
    train_set, val_set = _sets(tiny_bert)
    model = _model(tiny_bert)
    res = trainer.train_local(
        model, train_set, val_set, task="classification",
        train_cfg=TrainConfig(local_epochs=30, batch_size=8, learning_rate=0.3,
                              epoch_patience=1),
        privacy_cfg=PrivacyConfig(enabled=False), noise_multiplier=0.0, device=CPU,
        pad_id=0, seed=0)
    assert res.steps < 30 * 9


def test_causal_lm_loss_is_per_sequence_over_response_tokens(tiny_llama: Path
                                                            ) -> None:
    model = M.build_model(ModelConfig(name_or_path=str(tiny_llama),
                                      task="causal-lm"), LoraConfig(r=2))
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
             "loss_mask": torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0.]])}
    got = loops.per_sample_loss(model, batch, task="causal-lm")
    logits = model(input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).logits
    # sample 0 predicts tokens 2,3,4 from positions 1,2,3; sample 1 tokens 1,2
    l0 = F.cross_entropy(logits[0, 1:4], batch["input_ids"][0, 2:5])
    l1 = F.cross_entropy(logits[1, 0:2], batch["input_ids"][1, 1:3])
    assert torch.allclose(got, torch.stack([l0, l1]), atol=1e-5)


def test_causal_lm_dp_training_and_perplexity(tiny_llama: Path, sft_file: Path
                                              ) -> None:
    tok = M.load_tokenizer(str(tiny_llama))
    recs = data.read_records(str(sft_file), required=["prompt", "response"])
    ds = data.encode_sft(recs, tok, cfg=DataConfig(max_length=24))
    model = M.build_model(ModelConfig(name_or_path=str(tiny_llama),
                                      task="causal-lm"), LoraConfig(r=2))
    res = trainer.train_local(
        model, ds, data.EncodedDataset([]), task="causal-lm",
        train_cfg=TrainConfig(max_steps=4, batch_size=4), privacy_cfg=PrivacyConfig(),
        noise_multiplier=0.5, device=CPU, pad_id=int(tok.pad_token_id), seed=0)
    ev = loops.evaluate(model, ds, task="causal-lm", batch_size=8, device=CPU,
                          pad_id=int(tok.pad_token_id))
    assert res.steps == 4 and math.isnan(res.val_loss)
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))


def test_device_and_precision_choices() -> None:
    assert loops.resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert loops.resolve_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="CUDA is not available"):
            loops.resolve_device("cuda")
    with pytest.raises(ConfigError, match="fp16 needs loss scaling"):
        loops.autocast(CPU, "fp16", dp=True)
    assert loops.autocast(CPU, "auto", dp=True) is not None


def test_empty_dataset_evaluates_to_nothing(tiny_bert: Path) -> None:
    assert loops.evaluate(_model(tiny_bert), data.EncodedDataset([]),
                            task="classification", batch_size=4, device=CPU,
                            pad_id=0) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dp_training_on_cuda_bf16(tiny_bert: Path) -> None:
    train_set, val_set = _sets(tiny_bert)
    model = _model(tiny_bert)
    res = trainer.train_local(
        model, train_set, val_set, task="classification",
        train_cfg=replace(TrainConfig(max_steps=5), precision="bf16"),
        privacy_cfg=PrivacyConfig(), noise_multiplier=1.0,
        device=torch.device("cuda"), pad_id=0, seed=0)
    assert res.steps == 5 and math.isfinite(res.train_loss)


DEVICES = [CPU, pytest.param(torch.device("cuda"), marks=[pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES, ids=["cpu", "cuda"])
def test_one_dp_step_moves_every_lora_tensor(tiny_bert: Path, device: torch.device
                                            ) -> None:
    # the silent failure this guards against (Opacus #820, peft #3409): the loss
    # and epsilon look normal while the model's LoRA weights stay where they were
    train_set, val_set = _sets(tiny_bert)
    model = _model(tiny_bert)
    before = M.adapter_state(model)
    res = trainer.train_local(
        model, train_set, val_set, task="classification",
        train_cfg=TrainConfig(max_steps=1, batch_size=16, learning_rate=1e-2,
                              warmup_ratio=0.0),
        privacy_cfg=PrivacyConfig(max_grad_norm=1.0), noise_multiplier=1.0,
        device=device, pad_id=0, seed=0)
    after = M.adapter_state(model)
    lora = [k for k in before if "lora_" in k]
    assert res.steps == 1 and lora
    # B starts at zero and A gets its gradient through B: after one step B moved
    assert all(not torch.equal(before[k], after[k]) for k in lora if "lora_B" in k)


def test_a_step_that_moves_nothing_fails_the_round(
        tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_set, val_set = _sets(tiny_bert)
    model = _model(tiny_bert)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    with pytest.raises(trainer.NoOpStep, match="3 DP-SGD optimizer step.s. on cpu "
                       "left every adapter tensor unchanged"):
        trainer.train_local(
            model, train_set, val_set, task="classification",
            train_cfg=TrainConfig(max_steps=3, batch_size=16, learning_rate=1e-2),
            privacy_cfg=PrivacyConfig(max_grad_norm=1.0), noise_multiplier=1.0,
            device=CPU, pad_id=0, seed=0)


def test_sgd_optimizer_is_configurable_and_learns(tiny_bert: Path) -> None:
    train_set, val_set = _sets(tiny_bert)
    model = _model(tiny_bert)
    cfg = TrainConfig(optimizer="sgd", momentum=0.5, learning_rate=0.5,
                      local_epochs=8, batch_size=8)
    opt = trainer.make_optimizer(list(model.parameters()), cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.5
    before = loops.evaluate(model, val_set, task="classification", batch_size=32,
                              device=CPU, pad_id=0)["loss"]
    trainer.train_local(model, train_set, val_set, task="classification",
                        train_cfg=cfg, privacy_cfg=PrivacyConfig(enabled=False),
                        noise_multiplier=0.0, device=CPU, pad_id=0, seed=0)
    after = loops.evaluate(model, val_set, task="classification", batch_size=32,
                             device=CPU, pad_id=0)["loss"]
    assert after < before - 0.1


def test_proximal_step_pulls_towards_the_global_adapter() -> None:
    p = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    trainer.proximal_step([p], [torch.zeros(2)], lr=0.1, mu=0.5)
    # w - lr * mu * (w - w_global) = w * 0.95
    assert torch.allclose(p.data, torch.tensor([1.9, -0.95]))


def test_dp_noise_is_seeded_from_entropy_unless_told_otherwise() -> None:
    secure = {trainer._seeds(7, dp=True, secure=True) for _ in range(3)}
    assert len(secure) == 3 and (7, 8) not in secure
    assert trainer._seeds(7, dp=True, secure=False) == (7, 8)
    assert trainer._seeds(7, dp=False, secure=True) == (7, 8)


@pytest.mark.parametrize("hidden", [0, 8], ids=["linear-head", "mlp-head"])
def test_head_only_rounds_train_the_head_on_cached_features(tiny_bert: Path,
                                                             hidden: int) -> None:
    # Prepare: two identical models; LoRA frozen on both (a head-only round)
    train_set, val_set = _sets(tiny_bert)
    cfg = TrainConfig(local_epochs=2, batch_size=8, learning_rate=5e-2, optimizer="sgd",
                      momentum=0.0, warmup_ratio=0.0)
    head = ModelConfig(name_or_path=str(tiny_bert), head_hidden=hidden,
                       head_init="zero" if hidden else "labels")
    models = [M.build_model(head, LoraConfig(r=4), num_labels=3) for _ in range(2)]
    for m in models:
        M.set_adapter_trainable(m, LoraConfig(r=4), trainable=False)
    before = M.adapter_state(models[0])
    # Execute: the full model vs the head on cached pooled features, same batches
    for m, head_only in zip(models, (False, True), strict=True):
        trainer.train_local(m, train_set, val_set, task="classification",
                            train_cfg=cfg, privacy_cfg=PrivacyConfig(enabled=False),
                            noise_multiplier=0.0, device=CPU, pad_id=0, seed=3,
                            head_only=head_only)
    # Assert: the same head; LoRA untouched; the features are cached by LoRA state
    full, cached = (M.adapter_state(m) for m in models)
    for k in full:
        assert torch.allclose(full[k], cached[k], atol=1e-5), k
        assert torch.equal(full[k], before[k]) == (".head." not in k), k
    feats = trainer.head_features(models[1], train_set, device=CPU, pad_id=0,
                                  batch_size=32)
    assert feats is trainer.head_features(models[1], train_set, device=CPU, pad_id=0,
                                          batch_size=32)
    assert len(feats) == len(train_set) and feats[0]["features"].shape == (32,)


def test_dp_head_only_round_with_logit_adjustment_and_weights(tiny_bert: Path
                                                             ) -> None:
    train_set, val_set = _sets(tiny_bert)
    model = _model(tiny_bert)
    M.set_adapter_trainable(model, LoraConfig(r=4), trainable=False)
    res = trainer.train_local(
        model, train_set, val_set, task="classification",
        train_cfg=TrainConfig(local_epochs=2, batch_size=16, learning_rate=5e-2),
        privacy_cfg=PrivacyConfig(secure_noise=False), noise_multiplier=0.5,
        device=CPU, pad_id=0, seed=0, head_only=True,
        class_weights=torch.tensor([1.0, 0.5, 0.25]),
        logit_bias=torch.log(torch.tensor([0.2, 0.3, 0.5])))
    assert res.steps == 2 * int(1 / res.sample_rate) and math.isfinite(res.train_loss)


def test_features_are_shared_between_a_simulations_processes(
        tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: records of mixed lengths (computed shortest first, returned in order)
    from fedtune.common import features

    train_set, val_set = _sets(tiny_bert)
    model = _model(tiny_bert)
    M.set_adapter_trainable(model, LoraConfig(r=4), trainable=False)
    model.eval()
    with torch.no_grad():
        plain = [loops.class_logits(model, data.collate([x], pad_id=0))[0]
                 for x in train_set.items[:5]]
    monkeypatch.setattr(features, "_FEATURES", type(features._FEATURES)())
    monkeypatch.setenv(features.SHARED_ENV, str(tmp_path))
    # Execute: one process computes; another (an empty memory cache) reads them
    first = features.head_features(model, train_set, device=CPU, pad_id=0,
                                   batch_size=7)
    counts = features.cache_counts()
    features._FEATURES.clear()
    second = features.head_features(model, train_set, device=CPU, pad_id=0,
                                    batch_size=7)
    # Assert: the same features, in the records' order (the head on them gives the
    # whole model's logits), through one file; the other process computed nothing
    assert len(list(tmp_path.glob("*.pt"))) == 1
    after = features.cache_counts()
    assert after["shared"] == counts["shared"] + 1
    assert after["computed"] == counts["computed"]
    head = features.HeadOnly(M.classifier_head(model)[1])
    for i, want in enumerate(plain):
        assert torch.equal(first[i]["features"], second[i]["features"])
        assert torch.allclose(head(first[i]["features"][None])[0], want, atol=1e-5)
    # ... a changed encoder (LoRA moved) is another entry, and a head-only round's
    # validation loss (on the cached features) is the whole model's
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.1)
    features.head_features(model, train_set, device=CPU, pad_id=0, batch_size=7)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    res = trainer.train_local(
        model, train_set, val_set, task="classification",
        train_cfg=TrainConfig(local_epochs=1, batch_size=16, learning_rate=1e-9),
        privacy_cfg=PrivacyConfig(enabled=False), noise_multiplier=0.0, device=CPU,
        pad_id=0, seed=0, head_only=True)
    full = loops.evaluate(model, val_set, task="classification", batch_size=32,
                               device=CPU, pad_id=0)["loss"]
    assert res.val_loss == pytest.approx(full, rel=1e-4)
