"""A causal LM's loss with its LM head run only where the loss reads equals the
whole computation (the head at every position): the same per-record loss and the
same per-record gradients, hence the same clipping and DP noise, for every PEFT
method a causal LM may train, on the whole model and on cached top layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedtune.client import dpsgd
from fedtune.common import adapters, data, features, loops, toplayers
from fedtune.common import model as M
from fedtune.common.config import DataConfig, LoraConfig, ModelConfig
from fedtune.common.errors import ModelError

CPU = torch.device("cpu")


def _full_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: the model's own forward (peft's, for the prompt methods),
    logits at every position, the response tokens' mean."""
    logits = model(input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).logits
    logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1]:][:, :-1]
    target, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:]
    tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                          target.reshape(-1), reduction="none").view(target.shape)
    return (tok * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _sft(tiny_llama: Path, sft_file: Path, n: int = 10) -> data.EncodedDataset:
    tok = M.load_tokenizer(str(tiny_llama))
    recs = [{**r, "prompt": " ".join(r["prompt"].split()[: 2 + i % 6])}  # lengths vary
            for i, r in enumerate(data.read_records(
                str(sft_file), required=["prompt", "response"]))]
    return data.encode_for_task(recs[:n], tok, task="causal-lm",
                                cfg=DataConfig(max_length=48), source="sft")


def _model(tiny_llama: Path, method: str, top_layers: int = 0) -> nn.Module:
    model = M.build_model(ModelConfig(name_or_path=str(tiny_llama), task="causal-lm"),
                          LoraConfig(method=method, r=4, top_layers=top_layers,  # type: ignore[arg-type]  # a Literal
                                     virtual_tokens=3), seed=3)
    with torch.no_grad():  # B = 0, IA3 = 1 at init: move every trainable tensor
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.train()
    return model


def _per_record_grads(model: nn.Module, items: list[dict[str, torch.Tensor]]
                      ) -> list[dict[str, torch.Tensor]]:
    """Each record's gradient by plain autograd, one record (unpadded) at a time,
    through the whole LM head."""
    out = []
    for item in items:
        model.zero_grad()
        _full_loss(model, data.collate([item], pad_id=0)).sum().backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                    if p.requires_grad and p.grad is not None})
    model.zero_grad()
    return out


def _opacus(net: nn.Module, batch: dict[str, torch.Tensor], params: nn.Module
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss DP-SGD computes (the head at the read positions only) and
    Opacus' per-record gradients of it."""
    gsm: Any = dpsgd.wrap(net, "hooks", loss_reduction="sum")
    try:
        losses = loops.per_sample_loss(gsm, batch, task="causal-lm")
        losses.sum().backward()
        grads = {n: p.grad_sample.detach().clone()  # type: ignore[attr-defined]
                 for n, p in params.named_parameters() if p.requires_grad}
    finally:
        gsm._close()
    for p in params.parameters():
        p.grad, p.grad_sample = None, None  # type: ignore[attr-defined]
    return losses.detach(), grads


@pytest.mark.parametrize("method", ["lora", "ia3", "layernorm", "prompt", "prefix"])
def test_head_at_the_read_positions_gives_the_whole_computations_gradients(
        method: str, tiny_llama: Path, sft_file: Path) -> None:
    # Prepare: a padded batch of records of different lengths, and the reference
    model, ds = _model(tiny_llama, method), _sft(tiny_llama, sft_file)
    batch = data.collate(list(ds.items), pad_id=0)
    assert batch["attention_mask"].min() == 0
    with torch.no_grad():
        reference = _full_loss(model, batch)
    each = _per_record_grads(model, list(ds.items))
    # Execute
    losses, grads = _opacus(model, batch, model)
    # Assert: the same losses, and every record's gradient on every trainable tensor
    torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-5)
    assert grads and all(adapters.is_adapter(n) for n in grads)
    for name, g in grads.items():
        assert g.shape[0] == len(ds)
        for i, record in enumerate(each):
            torch.testing.assert_close(g[i], record[name], rtol=1e-5, atol=1e-5,
                                       msg=f"{method} {name} record {i}")
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-4


def test_cached_top_layers_with_the_head_at_the_read_positions(
        tiny_llama: Path, sft_file: Path) -> None:
    model, ds = _model(tiny_llama, "lora", top_layers=1), _sft(tiny_llama, sft_file)
    each = _per_record_grads(model, list(ds.items))
    top = toplayers.TopLayers(model, 1)
    cached = features.hidden_inputs(model, ds, layer=top.first, device=CPU,
                                    pad_id=0, batch_size=4)
    _, grads = _opacus(top, data.collate(list(cached.items), pad_id=0), model)
    assert grads
    for name, g in grads.items():
        for i, record in enumerate(each):
            torch.testing.assert_close(g[i], record[name], rtol=1e-5, atol=1e-5,
                                       msg=f"{name} record {i}")


def test_the_head_runs_on_the_read_positions_only(tiny_llama: Path,
                                                  sft_file: Path) -> None:
    model, ds = _model(tiny_llama, "lora"), _sft(tiny_llama, sft_file)
    batch = data.collate(list(ds.items), pad_id=0)
    holder = next(m for m in model.modules() if "lm_head" in m._modules)
    rows: list[int] = []
    hook = holder.lm_head.register_forward_hook(
        lambda _m, args, _out: rows.append(args[0].shape[0]))
    try:
        loops.per_sample_loss(model, batch, task="causal-lm")
    finally:
        hook.remove()
    assert rows == [int(batch["loss_mask"][:, 1:].sum())]  # one call, N positions
    assert isinstance(holder.lm_head, nn.Linear)  # put back


def test_prompt_methods_are_for_causal_lms_on_every_layer(tiny_bert: Path) -> None:
    with pytest.raises(ModelError, match="prompt and prefix tuning are offered for "
                                         "causal LMs"):
        M.build_model(ModelConfig(name_or_path=str(tiny_bert)),
                      LoraConfig(method="prefix"), num_labels=3)
    from fedtune.common.config import from_dict
    from fedtune.common.errors import ConfigError
    with pytest.raises(ConfigError, match="method prompt reaches every layer"):
        from_dict({"model": {"task": "causal-lm"},
                   "lora": {"method": "prompt", "top_layers": 1}})


def test_prompt_tuning_state_is_the_adapter_that_crosses_the_wire(
        tiny_llama: Path) -> None:
    model = _model(tiny_llama, "prompt")
    state = M.adapter_state(model)
    assert list(state) == ["prompt_embeddings"]
    assert state["prompt_embeddings"].shape[0] == 3  # one row per virtual token
    other = _model(tiny_llama, "prompt")
    M.set_adapter_state(other, state)
    torch.testing.assert_close(M.adapter_state(other)["prompt_embeddings"],
                               state["prompt_embeddings"])
