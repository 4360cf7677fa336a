"""Centralized evaluation of the global adapter on a held-out set, each round.

A classifier is scored on the held-out records' pooled features, computed once
and reused while LoRA does not change (every head-only round): a round's
evaluation then costs the head alone (:mod:`fedtune.common.features`). With
``lora.top_layers`` only the top layers run, on cached hidden states."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch

from fedtune.common import answers, data, loops, metrics
from fedtune.common.config import RunConfig
from fedtune.common.features import HeadOnly, head_features, hidden_inputs
from fedtune.common.model import classifier_head, load_tokenizer, set_adapter_state
from fedtune.common.toplayers import TopLayers

logger = logging.getLogger(__name__)


class CentralEvaluator:
    """Evaluates adapter states with one model built once on the server.

    Parameters
    ----------
    cfg : RunConfig
        The run; ``data.test_source`` names the held-out set ("" disables it).
    model : torch.nn.Module
        The server's model (base + LoRA) whose adapter is overwritten per call.
    device : torch.device
        Where to evaluate.
    """

    def __init__(self, cfg: RunConfig, model: torch.nn.Module,
                 device: torch.device) -> None:
        self.cfg, self.model, self.device = cfg, model.to(device), device
        tok = load_tokenizer(cfg.model.name_or_path, cfg.model.gguf_file)
        self.pad_id = int(tok.pad_token_id)
        self.dataset = None
        self.tokenizer = tok
        self.prompts: list[str] = []
        self.references: list[str] = []
        self.answer_tokens = 0
        if cfg.data.test_source:
            recs = data.read_records(
                cfg.data.test_source,
                required=data.required_columns(cfg.model.task, cfg.data),
                key="data.test_source (read on the server host)")
            if cfg.data.max_test_samples:
                recs = recs[: cfg.data.max_test_samples]
            self.dataset = data.encode_for_task(recs, tok, task=cfg.model.task,
                                                cfg=cfg.data,
                                                source=cfg.data.test_source)
            logger.info("central evaluation on %d held-out records", len(recs))
            if cfg.model.task == "causal-lm":  # also judged by what it answers
                asked = recs[: cfg.data.max_answer_samples or None]
                self.prompts = [str(r[cfg.data.prompt_column]) for r in asked]
                self.references = [str(r[cfg.data.response_column]) for r in asked]
                answers.check_pattern(cfg.data.answer_pattern, self.references,
                                      source=cfg.data.test_source)
                self.answer_tokens = 8 + max((len(tok(x, add_special_tokens=False)[
                    "input_ids"]) for x in self.references), default=0)
        self.retention_set = None
        if cfg.data.retention_source:
            recs = data.read_records(cfg.data.retention_source,
                                     required=[cfg.data.retention_column],
                                     key="data.retention_source (read on the "
                                     "server host)")
            recs = recs[: cfg.data.max_retention_samples or None]
            self.retention_set = data.encode_text(
                recs, tok, column=cfg.data.retention_column,
                max_length=cfg.data.length_cap)
            logger.info("retention (forgetting) check on %d general-text records",
                        len(self.retention_set))

    @property
    def size(self) -> int:
        """Held-out records (0: no central evaluation)."""
        return len(self.dataset) if self.dataset is not None else 0

    def majority_baseline(self) -> dict[str, float]:
        """What predicting the held-out set's most frequent class scores: the
        figure a model that learnt only the class prior ends at."""
        if self.dataset is None or not len(self.dataset) or \
                self.cfg.model.task != "classification":
            return {}
        truth = [int(self.dataset[i]["labels"]) for i in range(len(self.dataset))]
        top, count = Counter(truth).most_common(1)[0]
        return {"majority_accuracy": count / len(truth),
                "majority_macro_f1": metrics.macro_f1(
                    truth, [top] * len(truth), num_classes=len(self.cfg.data.labels))}

    def __call__(self, state: dict[str, torch.Tensor], *,
                 logit_bias: torch.Tensor | None = None) -> dict[str, Any]:
        """The held-out scores of adapter ``state`` (``logit_bias``: a calibrated
        decision bias on the logits)."""
        if self.dataset is None:
            return {}
        set_adapter_state(self.model, state)
        scored: torch.nn.Module = self.model
        dataset: Any = self.dataset
        k = self.cfg.lora.top_layers
        if self.cfg.model.task == "classification":
            dataset = head_features(self.model, self.dataset, device=self.device,
                                    pad_id=self.pad_id,
                                    batch_size=self.cfg.train.eval_batch_size,
                                    top_layers=k)
            scored = HeadOnly(classifier_head(self.model)[1])
        elif k:  # a causal LM's top layers on the cached states entering them
            scored = TopLayers(self.model, k)
            dataset = hidden_inputs(self.model, self.dataset, layer=scored.first,
                                    device=self.device, pad_id=self.pad_id,
                                    batch_size=self.cfg.train.eval_batch_size)
        out = loops.evaluate(
            scored, dataset, task=self.cfg.model.task, device=self.device,
            batch_size=self.cfg.train.eval_batch_size, pad_id=self.pad_id,
            labels=list(self.cfg.data.labels), precision=self.cfg.train.precision,
            logit_bias=logit_bias)
        if self.prompts:
            given = answers.generate(
                self.model, self.tokenizer, self.prompts,
                max_new_tokens=self.answer_tokens,
                batch_size=self.cfg.train.eval_batch_size, device=self.device,
                max_prompt_tokens=self.cfg.data.length_cap)
            out.update(answers.score(given, self.references,
                                     pattern=self.cfg.data.answer_pattern))
        return out

    def retention(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loss and perplexity on the general-text retention set ({} without)."""
        if self.retention_set is None or not len(self.retention_set):
            return {}
        set_adapter_state(self.model, state)
        out = loops.evaluate(
            self.model, self.retention_set, task="causal-lm", device=self.device,
            batch_size=self.cfg.train.eval_batch_size, pad_id=self.pad_id,
            precision=self.cfg.train.precision)
        return {"retention_loss": out["loss"],
                "retention_perplexity": out["perplexity"]}
