"""Run a model exported by ``fedtune export --merge`` with torch + transformers only.

(In fedtune this is :mod:`fedtune.common.standalone`, and the training model pools
with its :func:`mean_pool`: an export computes exactly what was trained.)

``fedtune export`` copies this file into every merged export as
``fedtune_standalone.py``. It imports no fedtune code, so a site or a colleague
without fedtune installed runs the model with::

    python fedtune_standalone.py EXPORT_DIR "first text" "second text"

or, from Python::

    from fedtune_standalone import load
    model = load("EXPORT_DIR")
    model(["first text"])   # [{"label": ..., "probabilities": {...}}] | [text]

What an export holds (``fedtune_model.json`` says which):

- causal LM: a plain ``AutoModelForCausalLM`` directory (LoRA merged into the
  weights); ``transformers`` alone loads it, this file only adds the prompt format
  fedtune trained with (prompt + newline, then the response);
- classification: the encoder as a plain ``AutoModel`` directory (LoRA merged) plus
  ``classifier_head.safetensors``. The model is: ``hidden =
  encoder(input_ids, attention_mask).last_hidden_state``; pooled = the mean of
  ``hidden`` over the positions where ``attention_mask`` is 1; ``logits = head(pooled)``
  where the head is ``Linear(width, num_labels)`` (keys ``weight``, ``bias``) or, with
  ``head_hidden`` > 0, ``Linear(width, head_hidden)``, GELU, ``Linear(head_hidden,
  num_labels)`` (keys ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``); label ``i``
  is ``labels[i]`` (also ``config.json``'s ``id2label``);
- ``--quantize int8``: the same model with every ``nn.Linear`` dynamically quantized
  to int8 with per-channel scales (``torch.ao.quantization.quantize_dynamic`` with
  ``per_channel_dynamic_qconfig``), saved as the state dict
  ``model.int8.pt`` (no ``model.safetensors``); it loads by building the fp32
  skeleton from ``config.json``, quantizing it the same way, and loading the state.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

META = "fedtune_model.json"
HEAD = "classifier_head.safetensors"
INT8 = "model.int8.pt"


def mean_pool(encoder: Any, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the encoder's last hidden state over the unmasked positions."""
    hidden = encoder(input_ids=input_ids,
                     attention_mask=attention_mask).last_hidden_state
    return masked_mean(hidden, attention_mask)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden`` over the positions where ``attention_mask`` is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled: torch.Tensor = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return pooled


class MeanPoolClassifier(nn.Module):
    """Encoder + masked mean pooling + head (the exported classification model)."""

    def __init__(self, encoder: Any, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(mean_pool(self.encoder, input_ids,
                                                   attention_mask))
        return logits


def head_module(width: int, num_labels: int, hidden: int) -> nn.Module:
    """The classification head's shape (weights loaded separately)."""
    if hidden:
        return nn.Sequential(nn.Linear(width, hidden), nn.GELU(),
                             nn.Linear(hidden, num_labels))
    return nn.Linear(width, num_labels)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide torch's deprecation notices for quantized tensors (one per layer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(quantiz|TypedStorage).*")
        yield


def quantize(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every ``nn.Linear`` (CPU inference), one scale
    per output channel: on the default task per-tensor scales cost 1.6 points of
    macro-F1, per-channel 0.2 (bench/export.py).

    torch marks ``torch.ao.quantization`` deprecated in favour of torchao, yet ships
    it (2.13 does); a torch without it gets an error that says so.
    """
    try:
        from torch.ao.quantization import (
            per_channel_dynamic_qconfig,
            quantize_dynamic,
        )
    except ImportError as err:
        raise RuntimeError(f"torch {torch.__version__} has no torch.ao.quantization "
                           "(int8 exports need torch <= 2.13, or export without "
                           "--quantize)") from err
    with _quiet():
        quantized: nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]  # torch's ao API has no annotations
            model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    return quantized


class Exported:
    """A loaded export: call it on a list of texts (or prompts)."""

    def __init__(self, directory: str | Path) -> None:
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForCausalLM,
            AutoTokenizer,
        )

        root = Path(directory)
        self.meta: dict[str, Any] = json.loads((root / META).read_text())
        self.task: str = self.meta["task"]
        self.max_length = int(self.meta.get("max_length", 512))
        self.tokenizer = AutoTokenizer.from_pretrained(str(root))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        int8 = (root / INT8).is_file()
        loader = AutoModel if self.task == "classification" else AutoModelForCausalLM
        skeleton = AutoConfig.from_pretrained(str(root))
        base = (loader.from_config(skeleton)  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
                if int8 else loader.from_pretrained(str(root)))
        model: nn.Module = base
        if self.task == "classification":
            self.labels: list[str] = list(self.meta["labels"])
            head = head_module(base.config.hidden_size, len(self.labels),
                               int(self.meta.get("head_hidden", 0)))
            if not int8:
                from safetensors.torch import load_file

                head.load_state_dict(load_file(str(root / HEAD)))
            model = MeanPoolClassifier(base, head)
        if int8:
            model = quantize(model)
            with _quiet():
                model.load_state_dict(torch.load(root / INT8, weights_only=True))
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, texts: list[str], *, max_new_tokens: int = 64
                 ) -> list[Any]:
        if self.task != "classification":
            return [self._generate(t, max_new_tokens) for t in texts]
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="pt")
        logits = self.model(enc["input_ids"], enc["attention_mask"]).float()
        if self.meta.get("decision_bias"):  # the run's calibrated decision bias
            logits = logits + torch.tensor(self.meta["decision_bias"])
        probs = torch.softmax(logits, -1)
        return [{"label": self.labels[int(p.argmax())],
                 "probabilities": dict(zip(self.labels, p.tolist(), strict=True))}
                for p in probs]

    def _generate(self, prompt: str, max_new_tokens: int) -> str:
        ids = self.tokenizer(prompt + "\n", return_tensors="pt",
                             add_special_tokens=False)
        out = self.model.generate(  # type: ignore[operator]  # a transformers model
            **ids, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id)
        return str(self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                         skip_special_tokens=True))


def load(directory: str | Path) -> Exported:
    """Load an export written by ``fedtune export --merge``."""
    return Exported(directory)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1] if __doc__ else "", file=sys.stderr)
        print("usage: python fedtune_standalone.py EXPORT_DIR TEXT [TEXT ...]",
              file=sys.stderr)
        return 2
    model = load(argv[0])
    for text, out in zip(argv[1:], model(argv[1:]), strict=True):
        print(json.dumps({"input": text, "prediction": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
