"""A causal LM's answers scored by exact match, whole and per field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.common import answers
from fedtune.common import model as M
from fedtune.common.config import LoraConfig, ModelConfig, from_dict
from fedtune.common.errors import ConfigError

PATTERN = r"The review is (?P<sentiment>[a-z]+); the condition is (?P<condition>[^.]+)"


def test_fields_and_exact_match_are_scored_apart() -> None:
    refs = ["The review is positive; the condition is Acne.",
            "The review is negative; the condition is Birth Control.",
            "The review is neutral; the condition is Pain.",
            "no fields here"]
    given = ["the review is  positive; the condition is acne",  # exact, normalised
             "The review is negative; the condition is Depression.",  # sentiment only
             "I think it is neutral",  # unreadable: no field
             "no fields here"]  # exact; its reference has no fields to score
    out = answers.score(given, refs, pattern=PATTERN)
    assert out == {"answer_exact": 0.5, "answer_sentiment": pytest.approx(2 / 3),
                   "answer_condition": pytest.approx(1 / 3)}
    assert answers.score(given, refs) == {"answer_exact": 0.5}
    assert answers.words({"eval_answer_exact": 0.5, "eval_loss": 1.0,
                          "eval_answer_sentiment": 0.25}) == \
        "exact 0.50, sentiment 0.25"


def test_greedy_answers_are_bounded_and_deterministic(tiny_llama: Path) -> None:
    model = M.build_model(ModelConfig(name_or_path=str(tiny_llama), task="causal-lm"),
                          LoraConfig(r=4))
    tok = M.load_tokenizer(str(tiny_llama))
    prompts = ["review : good great ?", "the drug was bad", "a"]
    kwargs = {"max_new_tokens": 3, "batch_size": 2, "device": torch.device("cpu")}
    first = answers.generate(model, tok, prompts, **kwargs)
    assert first == answers.generate(model, tok, prompts, **kwargs)  # greedy
    assert len(first) == 3 and all(len(a.split()) <= 3 for a in first)
    # left padding: a prompt's answer does not depend on its batch mates
    assert answers.generate(model, tok, prompts[:1], **kwargs)[0] == first[0]


def test_a_bad_answer_pattern_is_refused() -> None:
    with pytest.raises(ConfigError, match="answer_pattern: not a regular expression"):
        from_dict({"data": {"answer_pattern": "(unclosed"}})
    with pytest.raises(ConfigError, match="answer_pattern: needs named groups"):
        from_dict({"data": {"answer_pattern": "positive|negative"}})


def test_a_pattern_that_reads_no_held_out_answer_is_refused_before_training(
        tiny_llama: Path, sft_file: Path) -> None:
    from fedtune.common.errors import DataError
    from fedtune.server.runtime.central_eval import CentralEvaluator

    answers.check_pattern(r"the review is (?P<sentiment>\w+)",
                          ["the review is positive"], source="t")  # reads: fine
    cfg = from_dict({"model": {"name_or_path": str(tiny_llama), "task": "causal-lm"},
                     "lora": {"r": 4},
                     "data": {"source": str(sft_file), "test_source": str(sft_file),
                              "max_length": 48,
                              "answer_pattern": r"The condition is (?P<c>\w+)"}})
    model = M.build_model(cfg.model, cfg.lora)
    with pytest.raises(DataError, match=r"data.answer_pattern 'The condition is "
                                        r"\(\?P<c>\\\\w\+\)' matches none of the 24 "
                                        r"held-out answers in .*sft.jsonl \(one of "
                                        r"them: 'the review is"):
        CentralEvaluator(cfg, model, torch.device("cpu"))
