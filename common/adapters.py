"""The adapter a run trains (``lora.method``): LoRA, or a smaller PEFT method.

- ``lora`` (the default): low-rank A/B on the attention's query and value
  (``lora.r``, ``lora.alpha``);
- ``bitfit``: bias-only. A vector added to each linear layer's output (peft's
  BEFT, starting at 0): the same model as training the layer's own bias, kept apart
  so that only the vector leaves the site. Needs layers that carry biases;
- ``layernorm``: LayerNorm-only. A trainable copy of each layer's LayerNorms
  (peft's LN tuning), its weight and bias;
- ``ia3``: IA3. A scaling vector on key, value and the feed-forward output
  (peft's IA3, starting at 1);
- ``prompt`` (causal LM): prompt tuning. ``lora.virtual_tokens`` trained input
  embeddings before every prompt (peft's prompt tuning, each started from a
  token of the model's vocabulary);
- ``prefix`` (causal LM): prefix tuning. ``lora.virtual_tokens`` trained keys and
  values that every layer's attention reads before the prompt (peft's prefix
  tuning, without the reparametrising MLP: its per-record gradient is an
  embedding's, which Opacus computes exactly).

Every method but the two prompt methods sits on the transformer layers
``lora.top_layers`` names (the top k, the ones below cached; 0: every layer), and
the classification head trains with it.
``lora.target_modules`` overrides a method's targets. Opacus computes each method's
per-record gradients exactly (:mod:`fedtune.client.dpsgd`; tests hold them to the
whole model's within 1e-5). Pure torch + peft, no Flower.
"""

from __future__ import annotations

import re
from typing import Any

from peft import (
    BeftConfig,
    IA3Config,
    LNTuningConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)

from fedtune.common import recipes
from fedtune.common.errors import ModelError

# A parameter name holds one of these exactly when it is an adapter tensor (not
# the head): in peft's state-dict names and in named_parameters' alike
MARKERS = (".lora_A.", ".lora_B.", ".beft_bias", ".ln_tuning_layers.", ".ia3_l",
           "prompt_encoder.", "prompt_embeddings")
ENCODERS = ("bert", "roberta", "xlm-roberta")
DECODERS = ("llama", "mistral", "qwen2", "qwen3")
# each method's targets (module-name suffixes inside a transformer layer) by family
TARGETS: dict[str, dict[tuple[str, ...], list[str]]] = {
    "bitfit": {ENCODERS: ["query", "key", "value", "dense"],
               ("qwen2",): ["q_proj", "k_proj", "v_proj"]},
    "layernorm": {ENCODERS: ["LayerNorm"],
                  DECODERS: ["input_layernorm", "post_attention_layernorm"]},
    "ia3": {ENCODERS: ["key", "value", "output.dense"],
            DECODERS: ["k_proj", "v_proj", "down_proj"]},
}
# IA3 scales the input of these (the feed-forward projections), the output of the rest
FEEDFORWARD = {ENCODERS: ["output.dense"], DECODERS: ["down_proj"]}
LAYER_LISTS = ("layer", "layers", "h")


WORDS = {"bitfit": "bias-only (BitFit)", "layernorm": "LayerNorm-only",
         "ia3": "IA3", "prompt": "prompt tuning", "prefix": "prefix tuning"}


def describe(cfg: Any) -> str:
    """What a resolved run config trains, in words: "the head only", or the
    adapter (its layers) then "+ head" for a classifier."""
    lora = cfg.lora
    if cfg.model.task == "classification" and recipes.trained(cfg) == "head":
        return "the head only"
    what = WORDS.get(lora.method) or (f"LoRA r={lora.r}"
                                      f"{' (FFA)' if lora.ffa else ''}")
    if lora.prompt_method:
        what += f" ({lora.virtual_tokens} virtual tokens)"
    if lora.top_layers:
        what += f" on the top {lora.top_layers} layer(s)"
    if cfg.model.task != "classification":
        return what
    phase = "head rounds, then " if recipes.trained(cfg) == "head+lora" else ""
    return f"{phase}{what} + head"


def is_adapter(name: str) -> bool:
    """Whether a parameter or state-dict name is an adapter tensor (else: the
    classification head)."""
    return any(m in name for m in MARKERS)


def _family(table: dict[tuple[str, ...], list[str]], model_type: str
            ) -> list[str] | None:
    return next((v for k, v in table.items() if model_type in k), None)


def targets(method: str, model_type: str, configured: tuple[str, ...]) -> list[str]:
    """The module-name suffixes ``method`` adapts in a ``model_type`` model."""
    if configured:
        return list(configured)
    found = _family(TARGETS[method], model_type)
    if found is None:
        supported = sorted({t for fam in TARGETS[method] for t in fam})
        raise ModelError(f"lora.method: {method} cannot be hosted by model_type "
                         f"{model_type!r} (supported: {', '.join(supported)}); use "
                         "lora.method: lora or set lora.target_modules")
    return found


def layer_pattern(names: list[str], layers: list[int]) -> str:
    """A regex (peft matches it against the whole module name) for the modules
    ending in one of ``names`` inside the transformer layers ``layers``."""
    alts = "|".join(str(i) for i in layers)
    ends = "|".join(re.escape(n) for n in names)
    lists = "|".join(LAYER_LISTS)
    return rf".*\.(?:{lists})\.(?:{alts})\.(?:.*\.)?(?:{ends})"


def peft_config(method: str, *, model_type: str, layers: list[int],
                configured: tuple[str, ...], head: str | None, task_type: str | None,
                base_name: str, virtual_tokens: int = 8) -> PeftConfig:
    """The peft config of a non-LoRA ``method`` on the transformer ``layers``."""
    if method == "prompt":
        return PromptTuningConfig(task_type=task_type,
                                  base_model_name_or_path=base_name,
                                  num_virtual_tokens=virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    if method == "prefix":
        return PrefixTuningConfig(task_type=task_type,
                                  base_model_name_or_path=base_name,
                                  num_virtual_tokens=virtual_tokens,
                                  prefix_projection=False)
    pattern = layer_pattern(targets(method, model_type, configured), layers)
    common: dict[str, Any] = {"target_modules": pattern, "task_type": task_type,
                              "modules_to_save": [head] if head else None,
                              "base_model_name_or_path": base_name}
    if method == "bitfit":
        return BeftConfig(**common)
    if method == "layernorm":
        return LNTuningConfig(**common)
    feed = _family(FEEDFORWARD, model_type) or []
    return IA3Config(**common, feedforward_modules=layer_pattern(feed, layers)
                     if feed and not configured else [])


def check_model(pretrained: Any, lora: Any) -> None:
    """Refuse, before anything starts and in one line naming the method and the
    model, a non-LoRA ``lora.method`` that ``pretrained`` (a transformers model)
    cannot host: no targets for its family, none found, or (bitfit) no bias."""
    if lora.method == "lora":
        return
    model_type: str = pretrained.config.model_type
    if lora.prompt_method:
        if model_type not in DECODERS:
            raise ModelError(f"lora.method: {lora.method} cannot be hosted by "
                             f"model_type {model_type!r}: prompt and prefix tuning "
                             f"are offered for causal LMs ({', '.join(DECODERS)}); "
                             "use lora.method: lora, ia3, layernorm or bitfit")
        return
    names = targets(lora.method, model_type, lora.target_modules)
    found = [m for n, m in pretrained.named_modules()
             if any(n == t or n.endswith("." + t) for t in names)]
    if not found:
        raise ModelError(f"lora.method: {lora.method} found no module to adapt in "
                         f"model_type {model_type!r} (targets {names}); check "
                         "lora.target_modules")
    if lora.method == "bitfit" and any(getattr(m, "bias", None) is None
                                       for m in found):
        raise ModelError(f"lora.method: bitfit cannot be hosted by model_type "
                         f"{model_type!r}: its {names} layers carry no bias to "
                         "tune; use lora.method: ia3, layernorm or lora")
