"""``lora.method``: every adapter's per-record gradients, as Opacus computes them for
DP-SGD, equal the whole model's one record at a time; what cannot be hosted is
refused in one line; the adapter alone crosses the wire and reloads with peft."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from fedtune.client import dpsgd
from fedtune.common import adapters, data, features, loops, toplayers
from fedtune.common import model as M
from fedtune.common.config import DataConfig, LoraConfig, ModelConfig, from_dict
from fedtune.common.errors import ConfigError, ModelError
from tests.common.test_toplayers import _records

CPU = torch.device("cpu")
METHODS = ["lora", "bitfit", "layernorm", "ia3"]


def _moved(model: nn.Module) -> nn.Module:
    """Move every trainable tensor off its start (B = 0, IA3 = 1, bias = 0), so
    that no gradient is trivially zero or shared."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    model.train()
    return model


def _classifier(tiny_bert: Path, method: str, k: int = 0) -> nn.Module:
    return _moved(M.build_model(ModelConfig(name_or_path=str(tiny_bert)),
                                LoraConfig(r=4, method=method, top_layers=k),  # type: ignore[arg-type]  # a Literal from the parameter
                                num_labels=3, seed=3))


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _opacus(net: nn.Module, batch: dict[str, torch.Tensor], task: str, mode: str,
            names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Opacus' per-record gradients of ``net`` (what DP-SGD clips)."""
    gsm: nn.Module = dpsgd.wrap(net, mode, loss_reduction="sum")
    try:
        loops.per_sample_loss(gsm, batch, task=task).sum().backward()
        out = {names[id(p)]: p.grad_sample.detach().clone()  # type: ignore[attr-defined]
               for p in net.parameters() if p.requires_grad}
    finally:
        gsm._close()  # type: ignore[operator]  # Opacus' wrapper
    for p in net.parameters():
        p.grad, p.grad_sample = None, None  # type: ignore[attr-defined]
    return out


def _one_at_a_time(model: nn.Module, batch: dict[str, torch.Tensor], task: str
                   ) -> dict[str, torch.Tensor]:
    """The reference: each record alone through the whole model, plain autograd."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(len(batch["input_ids"])):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(
            loops.per_sample_loss(model, one, task=task).sum(), list(params.values()),
            allow_unused=True)
        for (n, p), g in zip(params.items(), grads, strict=True):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) for n, v in rows.items()}


def _assert_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                  method: str) -> None:
    assert got.keys() == want.keys()
    assert any(adapters.is_adapter(k) for k in got), got.keys()
    if method != "lora":
        assert not any(".lora_" in k for k in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5,
                                   msg=name)
    adapter = [v for k, v in want.items() if adapters.is_adapter(k)]
    assert max(float(v.abs().max()) for v in adapter) > 1e-3  # not all zero


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("method", METHODS)
def test_each_methods_per_record_gradients_are_the_whole_models(
        method: str, mode: str, tiny_bert: Path) -> None:
    # Prepare: every layer adapted; a padded batch of records of different lengths
    model, ds = _classifier(tiny_bert, method), _records(tiny_bert, 6)
    batch = data.collate(list(ds.items), pad_id=0)
    assert batch["attention_mask"].min() == 0
    # Execute
    want = _one_at_a_time(model, batch, "classification")
    got = _opacus(model, batch, "classification", mode, _names(model))
    # Assert: every trainable tensor, every record, within 1e-5
    _assert_exact(got, want, method)


@pytest.mark.parametrize("method", ["bitfit", "layernorm", "ia3"])
def test_each_method_on_cached_top_layers_gives_the_whole_models_gradients(
        method: str, tiny_bert: Path) -> None:
    # Prepare: the top layer adapted, the one below cached
    model, ds = _classifier(tiny_bert, method, k=1), _records(tiny_bert, 6)
    adapted = {toplayers.layer_of(n) for n, _ in model.named_parameters()
               if adapters.is_adapter(n)}
    assert adapted == {1}
    collate = functools.partial(data.collate, pad_id=0)
    # Execute: the whole model one record at a time, then Opacus on the cache
    want = _one_at_a_time(model, collate(list(ds.items)), "classification")
    top = toplayers.TopLayers(model, 1)
    cached = features.hidden_inputs(model, ds, layer=top.first, device=CPU,
                                    pad_id=0, batch_size=4)
    got = _opacus(top, collate(list(cached.items)), "classification", "hooks",
                  _names(model))
    # Assert
    _assert_exact(got, want, method)


@pytest.mark.parametrize("method", ["layernorm", "ia3"])
def test_a_causal_lms_adapter_gradients_are_exact(method: str, tiny_llama: Path,
                                                   sft_file: Path) -> None:
    # Prepare
    model = _moved(M.build_model(
        ModelConfig(name_or_path=str(tiny_llama), task="causal-lm"),
        LoraConfig(method=method), seed=3))  # type: ignore[arg-type]  # a Literal from the parameter
    tok = M.load_tokenizer(str(tiny_llama))
    recs = data.read_records(str(sft_file), required=["prompt", "response"])[:5]
    ds = data.encode_for_task(recs, tok, task="causal-lm",
                              cfg=DataConfig(max_length=48), source="sft")
    batch = data.collate(list(ds.items), pad_id=0)
    # Execute
    want = _one_at_a_time(model, batch, "causal-lm")
    got = _opacus(model, batch, "causal-lm", "hooks", _names(model))
    # Assert
    _assert_exact(got, want, method)


def test_what_an_architecture_cannot_host_is_refused_in_one_line(
        tiny_llama: Path) -> None:
    llama = ModelConfig(name_or_path=str(tiny_llama), task="causal-lm")
    one_line = (r"^lora\.method: bitfit cannot be hosted by model_type 'llama' "
                r"\(supported: .*\)[^\n]*$")
    with pytest.raises(ModelError, match=one_line):
        M.build_model(llama, LoraConfig(method="bitfit"))
    with pytest.raises(ModelError, match=r"^lora\.method: bitfit cannot be hosted "
                                         r"by model_type 'llama'[^\n]*$"):
        adapters.check_model(M.load_pretrained(llama), LoraConfig(method="bitfit"))
    adapters.check_model(M.load_pretrained(llama), LoraConfig(method="ia3"))
    with pytest.raises(ModelError, match=r"lora\.method: ia3 found no module to "
                                         r"adapt in model_type 'llama'"):
        M.build_model(llama, LoraConfig(method="ia3", target_modules=("nowhere",)))
    with pytest.raises(ConfigError, match="lora.method ia3 has neither"):
        from_dict({"lora": {"method": "ia3", "ffa": True}})
    with pytest.raises(ConfigError, match=r"lora\.method"):
        from_dict({"lora": {"method": "adapters"}})
    with pytest.raises(ConfigError, match=r"lora\.method: prefix tuning is offered "
                                          r"for causal LMs"):
        from_dict({"lora": {"method": "prefix"}})


@pytest.mark.parametrize("method", ["bitfit", "layernorm", "ia3"])
def test_only_the_adapter_and_head_leave_and_reload_with_plain_peft(
        method: str, tiny_bert: Path, tmp_path: Path) -> None:
    # Prepare
    cfg = ModelConfig(name_or_path=str(tiny_bert))
    model = _classifier(tiny_bert, method)
    state = M.adapter_state(model)
    head = [k for k in state if not adapters.is_adapter(k)]
    batch = data.collate(list(_records(tiny_bert, 4).items), pad_id=0)
    # Execute: a head-only round freezes the adapter; save, reload with plain peft
    M.set_adapter_trainable(model, LoraConfig(method=method), trainable=False)  # type: ignore[arg-type]  # a Literal from the parameter
    frozen = [n for n, p in model.named_parameters() if p.requires_grad]
    M.save_adapter(model, tmp_path / "a")
    back = M.load_adapter(cfg, tmp_path / "a", num_labels=3).eval()
    # Assert: the head's two tensors beside the adapter's; nothing of the encoder's
    assert sorted(head) == sorted(k for k in state if ".head." in k) and len(head) == 2
    assert all(not adapters.is_adapter(n) for n in frozen) and frozen
    assert sum(v.numel() for v in state.values()) < 5_000  # vectors, not matrices
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            back(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
