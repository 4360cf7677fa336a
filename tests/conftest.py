"""Shared fixtures: tiny random models saved to disk (loaded through the real
``from_pretrained`` path) and small synthetic data files."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import pytest
import torch

# Every Ray the tests start stays on the loopback: Ray otherwise turns 127.0.0.1
# into this machine's routable address (a cluster's other machines must reach
# it); this setting, meant for single-machine Ray on macOS and Windows, keeps
# heads, workers and drivers on 127.0.0.1. Set before any test imports Ray (it is
# read at import), so the forkserver of tests/integration/runner.py has it too.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

WORDS = {
    "positive": ["good", "great", "helped", "better", "relief", "love"],
    "negative": ["bad", "awful", "worse", "pain", "nausea", "hate"],
    "neutral": ["okay", "maybe", "some", "mixed", "average", "unsure"],
}
FILLER = ["the", "drug", "i", "took", "it", "for", "weeks", "and", "felt", "was"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]


def _tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_words = SPECIAL + FILLER + [w for ws in WORDS.values() for w in ws] + [
        "review", "is", "positive", "negative", "neutral", "the", "condition", ":",
        ";", ".", "?", "a", "b", "c"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                   unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="</s>")
    fast.save_pretrained(directory)


def _save_tiny(factory: pytest.TempPathFactory, name: str,
               model: torch.nn.Module) -> Path:
    out = factory.mktemp(name)
    model.save_pretrained(out)  # type: ignore[operator]
    _tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random BERT + word-level tokenizer, saved like a hub model."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return _save_tiny(tmp_path_factory, "tiny-bert", BertModel(cfg))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random Llama + word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=4, bos_token_id=2)
    return _save_tiny(tmp_path_factory, "tiny-llama", LlamaForCausalLM(cfg))


def make_reviews(n: int, seed: int) -> list[dict[str, str]]:
    """Synthetic reviews whose label words decide the rating."""
    rng = random.Random(seed)
    conditions = ["acne", "pain", "anxiety", "insomnia", "migraine", "asthma"]
    rows = []
    for i in range(n):
        label = rng.choice(["positive", "negative", "neutral"])
        words = rng.sample(WORDS[label], 3) + rng.sample(FILLER, 4)
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "rating": label,
                     "condition": conditions[i % len(conditions)]})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def review_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train.jsonl with 120 rows, test.jsonl with 40 rows)."""
    out = tmp_path_factory.mktemp("reviews")
    return (write_jsonl(out / "train.jsonl", make_reviews(120, 0)),
            write_jsonl(out / "test.jsonl", make_reviews(40, 1)))


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sft")
    rows = [{"prompt": f"review : {r['review']} ?",
             "response": f"the review is {r['rating']}", "condition": r["condition"]}
            for r in make_reviews(24, 2)]
    return write_jsonl(out / "sft.jsonl", rows)


REVIEW_DATA = {"text_column": "review", "label_column": "rating",
               "labels": ["negative", "neutral", "positive"]}
# LoRA from round 1, none of the DP recipe's pieces: what the infrastructure tests
# (payloads, ranks, compression, SecAgg+, resume) exercise. The recipe's own tests
# set its keys or use the defaults.
LORA_ONLY = {"linear_probe_rounds": 0, "logit_adjustment": 0.0,
             "calibrate_decisions": False}


def tiny_config(model_dir: Path, train_file: Path, test_file: Path, **sections: dict
                ) -> dict:
    """A nested run config for the tiny BERT and the synthetic reviews."""
    base = {
        "model": {"name_or_path": str(model_dir), "head_init": "random"},
        "lora": {"r": 4, "alpha": 8},
        "train": {"batch_size": 8, "learning_rate": 1e-2, "eval_batch_size": 32,
                  **LORA_ONLY},
        "data": {"source": str(train_file), "test_source": str(test_file),
                 "max_length": 32, **REVIEW_DATA,
                 "partition": "iid"},
        "federation": {"num_sites": 3, "num_rounds": 2, "min_train_nodes": 3},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


@pytest.fixture
def flower_identity():
    """Let tests build Flower Messages outside a running Flower process."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(autouse=True)
def _fedtune_logs_reach_caplog(caplog: pytest.LogCaptureFixture):  # noqa: ANN202
    """Send the ``fedtune`` loggers' records to caplog, whatever ran before.

    ``ensure_app_logging`` (run by any ClientApp/ServerApp built in-process) gives
    the ``fedtune`` logger its own handler and stops propagation to the root, where
    caplog listens, unless the logger has a handler already. Give it caplog's, and
    no propagation, so every record is captured exactly once in every test order.
    """
    ours = logging.getLogger("fedtune")
    propagate = ours.propagate
    ours.addHandler(caplog.handler)
    ours.propagate = False
    yield
    ours.removeHandler(caplog.handler)
    ours.propagate = propagate
