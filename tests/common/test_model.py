from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedtune.common import hub
from fedtune.common import model as M
from fedtune.common.config import LoraConfig, ModelConfig
from fedtune.common.errors import ModelError


def test_only_lora_and_head_are_trainable(tiny_bert: Path) -> None:
    m = M.build_model(ModelConfig(name_or_path=str(tiny_bert)), LoraConfig(r=4),
                      num_labels=3)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or ".head." in n for n in names)
    state = M.adapter_state(m)
    assert all("lora_A" in k or "lora_B" in k or ".head." in k for k in state)
    trainable = sum(p.numel() for _, p in m.named_parameters() if p.requires_grad)
    assert sum(t.numel() * t.element_size() for t in state.values()) == 4 * trainable


def test_same_seed_same_initial_adapter(tiny_bert: Path) -> None:
    cfg = ModelConfig(name_or_path=str(tiny_bert))
    a = M.adapter_state(M.build_model(cfg, LoraConfig(), num_labels=2, seed=3))
    b = M.adapter_state(M.build_model(cfg, LoraConfig(), num_labels=2, seed=3))
    c = M.adapter_state(M.build_model(cfg, LoraConfig(), num_labels=2, seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_peft_save_load_round_trip_with_plain_peft(tiny_bert: Path,
                                                   tmp_path: Path) -> None:
    # Prepare: a model whose adapter differs from a fresh one
    cfg = ModelConfig(name_or_path=str(tiny_bert))
    m = M.build_model(cfg, LoraConfig(r=4), num_labels=3)
    state = {k: torch.randn_like(v) for k, v in M.adapter_state(m).items()}
    M.set_adapter_state(m, state)
    # Execute
    out = M.save_adapter(m, tmp_path / "adapter", meta={"labels": ["a", "b", "c"]})
    loaded = PeftModel.from_pretrained(M.build_base(cfg, num_labels=3), str(out))
    # Assert
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    back = M.adapter_state(loaded)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    ids = torch.tensor([[5, 6, 7]])
    mask = torch.ones_like(ids)
    m.eval()
    loaded.eval()
    assert torch.allclose(m(input_ids=ids, attention_mask=mask),
                          loaded(input_ids=ids, attention_mask=mask))


def test_causal_lm_adapter_round_trip(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = ModelConfig(name_or_path=str(tiny_llama), task="causal-lm")
    m = M.build_model(cfg, LoraConfig(r=2))
    assert all(("q_proj" in k or "v_proj" in k) and "lora_" in k
               for k in M.adapter_state(m))
    M.save_adapter(m, tmp_path / "a")
    loaded = M.load_adapter(cfg, tmp_path / "a")
    a, b = M.adapter_state(m), M.adapter_state(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_set_adapter_state_rejects_misfits(tiny_bert: Path) -> None:
    m = M.build_model(ModelConfig(name_or_path=str(tiny_bert)), LoraConfig(r=4),
                      num_labels=2)
    state = M.adapter_state(m)
    first = next(iter(state))
    with pytest.raises(ModelError, match="missing="):
        M.set_adapter_state(m, {k: v for k, v in state.items() if k != first})
    with pytest.raises(ModelError, match=r"extra=\['evil'\]"):
        M.set_adapter_state(m, {**state, "evil": torch.zeros(1)})
    with pytest.raises(ModelError, match="wrong_shape="):
        M.set_adapter_state(m, {**state, first: torch.zeros(1, 1)})


def test_bad_model_inputs_are_clear(tmp_path: Path, tiny_bert: Path) -> None:
    with pytest.raises(ModelError, match="cannot load .*Name a local directory"):
        M.build_model(ModelConfig(name_or_path=str(tmp_path / "nowhere")),
                      LoraConfig(), num_labels=2)
    with pytest.raises(ModelError, match="needs >= 2 labels"):
        M.build_model(ModelConfig(name_or_path=str(tiny_bert)), LoraConfig(),
                      num_labels=1)
    with pytest.raises(ModelError, match="LoRA does not fit"):
        M.build_model(ModelConfig(name_or_path=str(tiny_bert)),
                      LoraConfig(target_modules=("no_such_layer",)), num_labels=2)
    with pytest.raises(ModelError, match="set lora.target_modules"):
        M.target_modules("mystery-arch", LoraConfig())


def test_ffa_freezes_a_and_sends_only_b(tiny_bert: Path) -> None:
    # Prepare / Execute: two independent builds with the same seed
    cfg, lora = ModelConfig(name_or_path=str(tiny_bert)), LoraConfig(r=4, ffa=True)
    one = M.build_model(cfg, lora, num_labels=3, seed=5)
    two = M.build_model(cfg, lora, num_labels=3, seed=5)
    # Assert: A frozen and identical (same digest), never exchanged
    trainable = [n for n, p in one.named_parameters() if p.requires_grad]
    assert trainable and not any(".lora_A." in n for n in trainable)
    assert any(".lora_B." in n for n in trainable)
    sent = M.exchanged_state(one, lora)
    assert sent and not any(".lora_A." in k for k in sent)
    assert len(sent) < len(M.adapter_state(one))
    assert M.frozen_a_digest(one) == M.frozen_a_digest(two)
    other = M.build_model(cfg, lora, num_labels=3, seed=6)
    assert M.frozen_a_digest(other) != M.frozen_a_digest(one)


def test_lower_rank_site_is_a_slice_with_the_global_scaling(tiny_bert: Path
                                                            ) -> None:
    cfg = ModelConfig(name_or_path=str(tiny_bert))
    full = M.build_model(cfg, LoraConfig(r=8, alpha=16), num_labels=2)
    small = M.build_model(cfg, LoraConfig(r=8, alpha=16), num_labels=2, rank=2)
    shapes = {k: tuple(v.shape) for k, v in M.adapter_state(small).items()}
    assert all(s[0] == 2 for k, s in shapes.items() if ".lora_A." in k)
    assert all(s[1] == 2 for k, s in shapes.items() if ".lora_B." in k)
    scale = {m.scaling["default"] for m in small.modules() if hasattr(m, "scaling")
             and isinstance(m.scaling, dict) and m.scaling}
    assert scale == {m.scaling["default"] for m in full.modules()
                     if hasattr(m, "scaling") and isinstance(m.scaling, dict)
                     and m.scaling} == {2.0}


def test_zero_mlp_head_starts_every_class_equal(tiny_bert: Path) -> None:
    model = M.build_model(ModelConfig(name_or_path=str(tiny_bert), head_init="zero",
                                      head_hidden=16), LoraConfig(r=4), num_labels=3)
    ids = torch.tensor([[2, 5, 6, 3]])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert torch.equal(logits, torch.zeros((1, 3)))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(".head." in n for n in names) == 4  # two layers, weight and bias


def test_weights_replaced_on_disk_are_loaded_again(tiny_bert: Path,
                                                   tmp_path: Path) -> None:
    # Prepare: a copy of the model a long-lived site worker keeps loaded
    import os
    import shutil

    local = Path(shutil.copytree(tiny_bert, tmp_path / "model"))
    cfg = ModelConfig(name_or_path=str(local))
    first = M.load_pretrained(cfg)
    loads = M.base_loads()
    # Execute / Assert: unchanged files come from the cache; replaced weights do not
    assert M.load_pretrained(cfg) is first and M.base_loads() == loads
    weights = next(p for p in local.iterdir() if p.suffix == ".safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns,
                          weights.stat().st_mtime_ns + 10**9))
    assert M.load_pretrained(cfg) is not first and M.base_loads() == loads + 1
    assert M.stamp(str(local)) != M.stamp(str(tiny_bert))


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "no-answer"])
def test_a_hub_id_without_a_hub_fails_fast_in_one_line(
        monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    # a hospital's machine without internet: no minute of hub retries first
    import socket
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # a hub endpoint where nothing answers
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    hub.hub_reachable.cache_clear()
    start = time.monotonic()
    try:
        with pytest.raises(ModelError) as info:
            M.load_pretrained(ModelConfig(name_or_path="org/model"))
    finally:
        hub.hub_reachable.cache_clear()
    assert time.monotonic() - start < 10
    words = ("off (HF_HUB_OFFLINE)" if offline else "unreachable from this machine")
    assert f"'org/model' is no local path, and the Hugging Face hub is {words}" in \
        str(info.value)
    assert "\n" not in str(info.value)
