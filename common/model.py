"""Base model + LoRA (peft): build, get/set the adapter state, save in PEFT format.

Two tasks behind one switch (``model.task``):

- ``classification``: ``AutoModel`` encoder, masked mean pooling over the last hidden
  state, a linear head. The stock ``AutoModelForSequenceClassification`` [CLS]+pooler
  head collapsed to the majority class under DP-SGD in our spike (the per-sample
  gradient sat almost entirely in the classifier); mean pooling is what sentence
  encoders such as all-MiniLM were trained with and trains well under DP.
- ``causal-lm``: ``AutoModelForCausalLM``; the loss covers the response tokens only.

The trainable state - LoRA A/B of every targeted module plus the classification head
(peft ``modules_to_save``) - is the only thing that ever leaves a site.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from torch import nn

from fedtune.common import adapters, assets, hub, updates
from fedtune.common.adapters import is_adapter
from fedtune.common.config import LoraConfig, ModelConfig
from fedtune.common.errors import ModelError
from fedtune.common.standalone import mean_pool

logger = logging.getLogger(__name__)

# LoRA targets by transformers ``model_type`` (attention query/value projections).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"], "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"], "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"], "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"], "opt": ["q_proj", "v_proj"],
}
HEAD = "head"
FEDTUNE_META = "fedtune_model.json"
RUN_CONFIG = "fedtune_config.yaml"  # the run's config beside an exported adapter
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


class MeanPoolClassifier(nn.Module):
    """Encoder + masked mean pooling + a linear head, or with ``hidden`` > 0 a
    two-layer head (linear, GELU, linear)."""

    name_or_path: str = ""  # the base model's id (peft reads it)

    def __init__(self, encoder: Any, num_labels: int, hidden: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # peft reads model.config
        width = encoder.config.hidden_size
        self.head: nn.Module = (nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, num_labels))
            if hidden else nn.Linear(width, num_labels))

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = mean_pool(self.encoder, input_ids, attention_mask)
        logits: torch.Tensor = self.head(pooled.to(next(self.head.parameters()).dtype))
        return logits


def _gguf_cache(path: str, gguf_file: str) -> Path:
    key = hashlib.sha256(f"{Path(path).resolve()}::{gguf_file}".encode()).hexdigest()
    return assets.cache_dir() / "models" / key[:16]


def stamp(name_or_path: str, gguf_file: str = "") -> tuple[tuple[str, int, int], ...]:
    """(file, size, mtime) of a local model's top-level files: a long-lived process
    keys its caches on it, so weights replaced on disk are loaded again. () for a
    hub id (its cache is immutable by revision)."""
    path = Path(assets.resolve(name_or_path))
    files = [path] if path.is_file() else (
        sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [])
    if gguf_file and path.is_dir():
        files = [path / gguf_file]
    out = []
    for f in files:
        try:
            info = f.stat()
        except OSError:
            continue
        out.append((f.name, info.st_size, info.st_mtime_ns))
    return tuple(out)


@functools.lru_cache(maxsize=2)
def _load_pretrained(name_or_path: str, task: str, gguf_file: str, dtype: str,
                     files: tuple[tuple[str, int, int], ...] = ()) -> Any:
    """Load a base model once per process and version of its files (simulation
    actors and the site worker reuse it every round)."""
    from transformers import AutoModel, AutoModelForCausalLM

    loader = AutoModel if task == "classification" else AutoModelForCausalLM
    path = assets.resolve(name_or_path)
    logger.info("loading the base model %s", name_or_path)
    if gguf_file:
        cached = _gguf_cache(path, gguf_file)
        if (cached / "config.json").is_file():
            return hub.from_pretrained(loader, str(cached), dtype=_DTYPES[dtype])
        logger.info("dequantizing %s (one-time, cached in %s)", gguf_file, cached)
        model = hub.from_pretrained(loader, path, gguf_file=gguf_file,
                                 dtype=torch.float32)
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(cached)
        load_tokenizer(name_or_path, gguf_file).save_pretrained(cached)
        return model.to(_DTYPES[dtype])
    return hub.from_pretrained(loader, path, dtype=_DTYPES[dtype])


def base_loads() -> int:
    """How many times this process read a base model from disk."""
    return _load_pretrained.cache_info().misses


def load_tokenizer(name_or_path: str, gguf_file: str = "") -> Any:
    """The model's tokenizer, with a pad token (EOS where the model has none);
    cached per version of the model's files."""
    return _load_tokenizer(name_or_path, gguf_file, stamp(name_or_path, gguf_file))


@functools.lru_cache(maxsize=2)
def _load_tokenizer(name_or_path: str, gguf_file: str,
                    files: tuple[tuple[str, int, int], ...]) -> Any:
    from transformers import AutoTokenizer

    path = assets.resolve(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file and (_gguf_cache(path, gguf_file) / "tokenizer_config.json").is_file():
        path, kwargs = str(_gguf_cache(path, gguf_file)), {}
    tok = hub.from_pretrained(AutoTokenizer, path, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# lora.top_layers: the model types whose cached hidden states re-enter their kept
# layers (fedtune.common.toplayers), and how
ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert")  # embeddings bypassed
DECODERS = ("llama", "mistral", "qwen2", "qwen3")  # inputs_embeds go to layer 0


def num_layers(config: Any) -> int:
    """The transformer's layer count (``num_hidden_layers``, or GPT-2's ``n_layer``)."""
    return int(getattr(config, "num_hidden_layers", 0)
               or getattr(config, "n_layer", 0))


def check_top_layers(config: Any, top_layers: int) -> None:
    """Refuse ``lora.top_layers`` this model cannot honour, quoting its layers."""
    if not top_layers:
        return
    count = num_layers(config)
    if top_layers > count:
        raise ModelError(f"lora.top_layers: {top_layers} is more than the model's "
                         f"{count} layers; use 1..{count} (or 0 for every layer)")
    if config.model_type not in ENCODERS + DECODERS:
        raise ModelError(
            f"lora.top_layers: model_type {config.model_type!r} has no cached-layer "
            f"path (supported: {', '.join(ENCODERS + DECODERS)}); set "
            "lora.top_layers: 0")


def lora_layers(config: Any, top_layers: int) -> list[int] | None:
    """The layer indices that carry LoRA (None: every layer)."""
    if not top_layers:
        return None
    count = num_layers(config)
    return list(range(count - top_layers, count))


def target_modules(model_type: str, lora: LoraConfig) -> list[str]:
    """The configured LoRA targets, or the architecture's default."""
    if lora.target_modules:
        return list(lora.target_modules)
    if model_type not in DEFAULT_TARGETS:
        raise ModelError(f"no default LoRA targets for model_type {model_type!r}; set "
                         "lora.target_modules (e.g. [q_proj, v_proj])")
    return DEFAULT_TARGETS[model_type]


def load_pretrained(cfg: ModelConfig) -> Any:
    """The process-wide cached pretrained model. Shared: never train or mutate it;
    :func:`build_base` hands out copies."""
    return _load_pretrained(cfg.name_or_path, cfg.task, cfg.gguf_file, cfg.dtype,
                            stamp(cfg.name_or_path, cfg.gguf_file))


def build_base(cfg: ModelConfig, *, num_labels: int, seed: int = 0) -> nn.Module:
    """A fresh copy of the base model (with a seeded head for classification)."""
    pretrained = copy.deepcopy(load_pretrained(cfg))
    if cfg.task == "causal-lm":
        pretrained.name_or_path = cfg.name_or_path  # what adapter_config.json names
        causal: nn.Module = pretrained
        return causal
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MeanPoolClassifier(pretrained, num_labels, hidden=cfg.head_hidden)
    if cfg.head_init == "zero":  # the output layer: every class at the same logit
        head: Any = model.head
        out = head[-1] if cfg.head_hidden else head
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
    model.name_or_path = cfg.name_or_path
    return model


def build_model(cfg: ModelConfig, lora: LoraConfig, *, num_labels: int = 0,
                seed: int = 0, rank: int = 0) -> PeftModel:
    """Base model wrapped with LoRA; only adapter (and head) params are trainable.

    ``rank`` (0: ``lora.r``) builds a lower-rank site's adapter with the global
    scaling ``lora.alpha / lora.r``. With ``lora.ffa`` every ``lora_A`` is frozen at
    its seeded initial value (identical on every site for one ``seed``).
    """
    if cfg.task == "classification" and num_labels < 2:
        raise ModelError(f"classification needs >= 2 labels, got {num_labels}; set "
                         "data.labels")
    base: Any = build_base(cfg, num_labels=num_labels, seed=seed)
    config = base.encoder.config if cfg.task == "classification" else base.config
    check_top_layers(config, lora.top_layers)
    if lora.method != "lora":
        return _build_other(base, config, cfg, lora, seed=seed)
    r = rank or lora.r
    peft_cfg = PeftLoraConfig(
        r=r, lora_alpha=lora.alpha if r == lora.r else lora.alpha * r / lora.r,  # type: ignore[arg-type]  # peft says int; a lower rank's alpha is fractional
        lora_dropout=lora.dropout,
        target_modules=target_modules(base.config.model_type, lora),
        layers_to_transform=lora_layers(config, lora.top_layers),
        modules_to_save=[HEAD] if cfg.task == "classification" else None,
        task_type="CAUSAL_LM" if cfg.task == "causal-lm" else None,
        base_model_name_or_path=cfg.name_or_path,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # identical LoRA A init everywhere for a given seed
        try:
            model = get_peft_model(base, peft_cfg)
        except ValueError as err:
            raise ModelError(f"LoRA does not fit this model: {err}; check "
                             "lora.target_modules") from err
    if lora.ffa:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model


def _build_other(base: Any, config: Any, cfg: ModelConfig, lora: LoraConfig, *,
                 seed: int) -> PeftModel:
    """``base`` wrapped with a non-LoRA adapter (:mod:`fedtune.common.adapters`)."""
    adapters.check_model(base.encoder if cfg.task == "classification" else base,
                         lora)
    layers = lora_layers(config, lora.top_layers) or list(range(num_layers(config)))
    peft_cfg = adapters.peft_config(
        lora.method, model_type=config.model_type, layers=layers,
        configured=lora.target_modules,
        head=HEAD if cfg.task == "classification" else None,
        task_type="CAUSAL_LM" if cfg.task == "causal-lm" else None,
        base_name=cfg.name_or_path, virtual_tokens=lora.virtual_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with warnings.catch_warnings():  # LN tuning: peft's "unsupported layer
                # type" warning for the norms it copies (Opacus' tests cover them)
                warnings.filterwarnings("ignore", message="Unsupported layer type")
                model = get_peft_model(base, peft_cfg)
        except (ValueError, TypeError) as err:
            names = adapters.targets(lora.method, config.model_type,
                                     lora.target_modules)
            raise ModelError(f"lora.method: {lora.method} found no module to adapt "
                             f"in model_type {config.model_type!r} (targets "
                             f"{names}; peft: {str(err).split(':')[0]}); check "
                             "lora.target_modules") from err
    return model


def set_adapter_trainable(model: nn.Module, lora: LoraConfig, *, trainable: bool
                          ) -> None:
    """Freeze (linear-probe rounds: only the head trains) or unfreeze the adapter
    tensors; FFA-LoRA's A stays frozen either way."""
    for name, param in model.named_parameters():
        if is_adapter(name) and not (".lora_A." in name and lora.ffa):
            param.requires_grad_(trainable)


def classifier_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the module whose input is the pooled features, the trainable head inside
    it) of a classification model built by :func:`build_model`."""
    peft: Any = _unwrap(model)
    wrapper: Any = getattr(peft.base_model.model, HEAD)
    active = wrapper.active_adapters[0]
    return wrapper, wrapper.modules_to_save[active]


def trainable_parameters(model: nn.Module) -> int:
    """How many numbers DP-SGD noises each step (the trainable parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def exchanged_state(model: nn.Module, lora: LoraConfig, *, head_only: bool = False
                    ) -> dict[str, torch.Tensor]:
    """What crosses the wire: the adapter state, without the frozen A under FFA;
    ``head_only`` (a head-only round): the head alone, LoRA being frozen."""
    state = adapter_state(model)
    if head_only:
        return {k: v for k, v in state.items() if not is_adapter(k)}
    if lora.ffa:
        state = {k: v for k, v in state.items() if ".lora_A." not in k}
    return state


def frozen_a_digest(model: nn.Module) -> float:
    """48 bits of sha256 over every ``lora_A`` (exact as a float metric)."""
    frozen = {k: v.numpy() for k, v in adapter_state(model).items()
              if ".lora_A." in k}
    return float(int(updates.digest(frozen)[:12], 16))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (LoRA A/B + head) as detached fp32 CPU copies."""
    state = get_peft_model_state_dict(_unwrap(model), save_embedding_layers=False)
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone()
            for k, v in state.items()}


def adapter_values(model: nn.Module, values: dict[int, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """The adapter state's names and shapes filled with ``values`` (keyed by
    ``id`` of the model's parameter: a gradient sum, say) and zeros for every
    adapter tensor ``values`` has no entry for; fp32 CPU."""
    inner = _unwrap(model)
    filled = {n: values.get(id(p), torch.zeros_like(p))
              for n, p in inner.named_parameters()}
    state = get_peft_model_state_dict(inner, state_dict=filled,
                                      save_embedding_layers=False)
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone()
            for k, v in state.items()}


def set_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors, refusing missing/extra names or wrong shapes."""
    own = get_peft_model_state_dict(_unwrap(model), save_embedding_layers=False)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own.keys() & state.keys()
           if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or bad:
        raise ModelError(f"adapter state does not fit this model: missing={missing[:5]}"
                         f" extra={extra[:5]} wrong_shape={bad[:5]}")
    ref = next(iter(own.values()))
    set_peft_model_state_dict(_unwrap(model), {k: v.to(ref.device)
                                               for k, v in state.items()})


def _unwrap(model: nn.Module) -> nn.Module:
    """Peel Opacus' GradSampleModule (``_module``) off a PeftModel."""
    while not isinstance(model, PeftModel) and hasattr(model, "_module"):
        model = model._module  # type: ignore[assignment]  # Opacus' wrapper: the real module
    return model


def save_adapter(model: nn.Module, directory: str | Path, *,
                 meta: dict[str, Any] | None = None) -> Path:
    """Save in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``PeftModel.from_pretrained(build_base(cfg, ...), directory)`` loads it back; the
    side file ``fedtune_model.json`` records task and labels for that rebuild.
    """
    out = Path(directory)
    peft_model: Any = _unwrap(model)
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    meta = {**(meta or {}), ADAPTER_SHA256: assets.file_sha256(out / ADAPTER_FILE)}
    (out / FEDTUNE_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


ADAPTER_FILE = "adapter_model.safetensors"  # peft's name for the adapter's tensors
ADAPTER_SHA256 = "adapter_sha256"  # in fedtune_model.json: the file as saved



def load_adapter(cfg: ModelConfig, directory: str | Path, *, num_labels: int = 0
                 ) -> PeftModel:
    """Rebuild the base model and load a saved adapter with plain peft."""
    base = build_base(cfg, num_labels=num_labels)
    return PeftModel.from_pretrained(base, str(directory))
