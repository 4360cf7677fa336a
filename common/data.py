"""A site's private data: reading, checking, tokenizing (a simulation's
partitioning into sites is :mod:`fedtune.common.sites`).

Records are plain dicts read from JSONL, CSV or TSV. Classification records need a
text and a label column; causal-LM records a prompt and a response column. Every
problem (missing file, missing columns, empty data, unknown labels) is a
:class:`DataError` that names the file, the problem and the fix.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fedtune.common import assets
from fedtune.common.config import (
    AUTO_LENGTH_CAP,
    AUTO_LENGTH_PERCENTILE,
    DataConfig,
    RunConfig,
    describe_problems,
)
from fedtune.common.errors import ConfigError, DataError

Record = dict[str, Any]
logger = logging.getLogger(__name__)


def file_stamp(source: str) -> tuple[int, ...]:
    """(inode, size, mtime) of a data file: a long-lived reader keys its cache on it,
    so an edited or replaced file is read again. () where there is no file (the
    reader then names the problem)."""
    try:
        info = Path(assets.resolve(source)).stat()
    except OSError:
        return ()
    return (info.st_ino, info.st_size, info.st_mtime_ns)


SITE_DATA = "data.source (simulation) or the node's data-path"


def read_records(source: str, *, required: Sequence[str], key: str = SITE_DATA
                 ) -> list[Record]:
    """Read a JSONL / CSV / TSV file (or ``fedtune:NAME`` asset) into records;
    ``key``: the setting that names the file, for the error that cannot find it."""
    path = Path(assets.resolve(source))
    if not path.is_file():
        raise DataError(f"{path}: data file not found; set {key} to an existing "
                        ".jsonl/.csv/.tsv file",
                        public="the site's data file is not found (the daemon's "
                        "--data)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            records = _read_jsonl(path)
        elif suffix in (".csv", ".tsv"):
            # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark
            with open(path, newline="", encoding="utf-8-sig") as fh:
                records = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv"
                                              else ","))
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, "
                            ".csv or .tsv", public=f"the site's data file is a "
                            f"{suffix!r} file; fedtune reads .jsonl, .csv or .tsv")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err}); re-save it as UTF-8",
                        public="the site's data file is not UTF-8 text") from err
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV ({err})",
                        public="the site's data file is malformed CSV") from err
    if not records:
        raise DataError(f"{path}: no records; the file is empty",
                        public="the site's data file is empty")
    missing = [c for c in required if c not in records[0]]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; found {sorted(records[0])}. Rename "
            "the columns or set data.text_column / label_column / prompt_column / "
            "response_column", public=f"the site's data has no column(s) {missing} "
            f"(it has {len(records[0])} others): check data.text_column / "
            "label_column / prompt_column / response_column")
    for i, rec in enumerate(records):
        empty = [c for c in required if rec.get(c) in (None, "")]
        if empty:
            raise DataError(
                f"{path}: record {i + 1} has empty {empty}; fill or drop it",
                public=f"a record of the site's data has an empty {empty}")
    return records


def _read_jsonl(path: Path) -> list[Record]:
    with open(path, encoding="utf-8-sig") as fh:
        return jsonl_records(fh, where=str(path))


def jsonl_records(lines: Iterable[str], *, where: str) -> list[Record]:
    """One JSON object per (non-blank) line; ``where`` names the source in errors."""
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(rec, dict):
            raise DataError(f"{where}:{lineno}: expected a JSON object per line")
        records.append(rec)
    return records


def label_ids(records: Sequence[Record], *, column: str, labels: Sequence[str],
              source: str = "data") -> list[int]:
    """Map label names to ids, rejecting labels the run does not declare."""
    index = {name: i for i, name in enumerate(labels)}
    unknown = Counter(str(r[column]) for r in records if str(r[column]) not in index)
    if unknown:
        present = {str(r[column]) for r in records}
        absent = sum(1 for name in labels if name not in present)
        raise DataError(
            f"{source}: unknown label(s) {sorted(unknown)} in column {column!r}; "
            f"the run declares data.labels={list(labels)}. Add them there or fix "
            "the data", public=f"the site's column {column!r} holds {len(unknown)} "
            f"label(s) that data.labels={list(labels)} does not declare "
            f"({absent} declared label(s) never occur there): check data.labels "
            "for a typo")
    return [index[str(r[column])] for r in records]


def with_labels(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``data.labels`` read from its training file where the config
    left them empty (it named its own ``data.source`` but no labels): the distinct
    values of ``data.label_column``, sorted, and logged. A causal LM, or labels
    given: ``cfg`` itself."""
    data = cfg.data
    if not cfg.classifies or data.labels:
        return cfg
    try:
        records = read_records(data.source, required=[data.label_column])
    except DataError as err:
        raise ConfigError(f"data.labels: not set, and cannot be read from the "
                          f"training data ({err}); list the run's labels under "
                          "data.labels") from err
    labels = tuple(sorted({str(r[data.label_column]) for r in records}))
    if len(labels) < 2:
        raise ConfigError(f"data.labels: {data.source} holds {len(labels)} distinct "
                          f"label(s) {list(labels)} in column {data.label_column!r}; "
                          "classification needs at least 2 (check data.label_column)")
    problems = describe_problems(labels, data.label_descriptions)
    if problems:
        raise ConfigError([f"data.{p} (labels read from {data.source}: "
                           f"{list(labels)})" for p in problems])
    logger.info("data.labels: not set; read %d from %s (column %r, sorted): %s",
                len(labels), data.source, data.label_column, ", ".join(labels))
    return dataclasses.replace(cfg, data=dataclasses.replace(data, labels=labels))


# --- partitioning (pure) ----------------------------------------------------------

# --- tokenization -----------------------------------------------------------------

class EncodedDataset(Dataset):  # type: ignore[type-arg]  # items vary by task
    """Token ids (+ label, or a loss mask over response tokens) per record."""

    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def encode_classification(records: Sequence[Record], tokenizer: Any, *,
                          cfg: DataConfig, source: str = "data") -> EncodedDataset:
    """Tokenize text records with their integer labels."""
    if not records:  # e.g. no validation split (transformers 5 fails on [])
        return EncodedDataset([])
    ys = label_ids(records, column=cfg.label_column, labels=cfg.labels, source=source)
    enc = tokenizer([str(r[cfg.text_column]) for r in records], truncation=True,
                    max_length=cfg.max_length)
    return EncodedDataset([
        {"input_ids": torch.tensor(ids), "labels": torch.tensor(y)}
        for ids, y in zip(enc["input_ids"], ys, strict=True)
    ])


def encode_sft(records: Sequence[Record], tokenizer: Any, *, cfg: DataConfig
               ) -> EncodedDataset:
    """Prompt + response (+ EOS); the loss mask covers the response tokens only.

    Long prompts are cut from the left so the response always survives truncation.
    """
    items = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for r in records:
        prompt = tokenizer(str(r[cfg.prompt_column]) + "\n",
                           add_special_tokens=False)["input_ids"]
        response = tokenizer(str(r[cfg.response_column]),
                             add_special_tokens=False)["input_ids"] + eos
        response = response[: cfg.max_length - 1]
        prompt = prompt[-(cfg.max_length - len(response)):]
        ids = prompt + response
        mask = [0] * len(prompt) + [1] * len(response)
        items.append({"input_ids": torch.tensor(ids),
                      "loss_mask": torch.tensor(mask, dtype=torch.float32)})
    return EncodedDataset(items)


def encode_text(records: Sequence[Record], tokenizer: Any, *, column: str,
                max_length: int) -> EncodedDataset:
    """Plain text for a language model's perplexity: the loss covers every token."""
    items = []
    for r in records:
        ids = tokenizer(str(r[column]), add_special_tokens=False,
                        truncation=True, max_length=max_length)["input_ids"]
        if len(ids) > 1:
            items.append({"input_ids": torch.tensor(ids),
                          "loss_mask": torch.ones(len(ids), dtype=torch.float32)})
    return EncodedDataset(items)


def required_columns(task: str, cfg: DataConfig) -> list[str]:
    """The columns a record needs for ``task``."""
    return ([cfg.text_column, cfg.label_column] if task == "classification"
            else [cfg.prompt_column, cfg.response_column])


def length_percentile(lengths: Sequence[int], *,
                      percentile: float = AUTO_LENGTH_PERCENTILE,
                      cap: int = AUTO_LENGTH_CAP) -> int:
    """The token limit that keeps ``percentile`` % of the records whole (nearest
    rank), at most ``cap``; at least 2."""
    if not lengths:
        return cap
    ranked = sorted(lengths)
    k = max(0, math.ceil(percentile / 100 * len(ranked)) - 1)
    return max(2, min(cap, ranked[k]))


def token_lengths(records: Sequence[Record], tokenizer: Any, *, task: str,
                  cfg: DataConfig) -> list[int]:
    """Each record's length in tokens, untruncated, as its task encodes it."""
    if task == "classification":
        texts = [str(r[cfg.text_column]) for r in records]
        return [len(ids) for ids in tokenizer(texts)["input_ids"]] if texts else []
    eos = int(tokenizer.eos_token_id is not None)
    return [len(tokenizer(str(r[cfg.prompt_column]) + "\n",
                          add_special_tokens=False)["input_ids"])
            + len(tokenizer(str(r[cfg.response_column]),
                            add_special_tokens=False)["input_ids"]) + eos
            for r in records]


def fit_length(records: Sequence[Record], tokenizer: Any, *, task: str,
               cfg: DataConfig, source: str = "data") -> DataConfig:
    """``cfg`` with ``max_length`` set: as configured, or (0) the
    :func:`length_percentile` of these records' token lengths, capped by the
    model's own limit too, and logged."""
    if cfg.max_length or not records:
        return cfg
    limit = getattr(tokenizer, "model_max_length", AUTO_LENGTH_CAP) or AUTO_LENGTH_CAP
    cap = min(AUTO_LENGTH_CAP, int(limit))
    lengths = token_lengths(records, tokenizer, task=task, cfg=cfg)
    fitted = length_percentile(lengths, cap=cap)
    logger.info("data.max_length follows the data: %d tokens for %s (the %gth "
                "percentile of %d records, cap %d; %d records truncated)", fitted,
                source, AUTO_LENGTH_PERCENTILE, len(lengths), cap,
                sum(1 for n in lengths if n > fitted))
    return dataclasses.replace(cfg, max_length=fitted)


def encode_for_task(records: Sequence[Record], tokenizer: Any, *, task: str,
                    cfg: DataConfig, source: str = "data") -> EncodedDataset:
    """Tokenize records for the run's task (classification or causal-LM SFT), at
    ``cfg.max_length`` tokens (0: :func:`fit_length`)."""
    cfg = fit_length(records, tokenizer, task=task, cfg=cfg, source=source)
    if task == "classification":
        return encode_classification(records, tokenizer, cfg=cfg, source=source)
    return encode_sft(records, tokenizer, cfg=cfg)


def collate(batch: list[dict[str, torch.Tensor]], *, pad_id: int = 0
            ) -> dict[str, torch.Tensor]:
    """Right-pad a batch; an empty batch (Poisson sampling) gives 0-row tensors."""
    if not batch:
        return {"input_ids": torch.zeros((0, 1), dtype=torch.long),
                "attention_mask": torch.zeros((0, 1), dtype=torch.long)}
    if "features" in batch[0]:  # cached head inputs (head-only rounds)
        return {"features": torch.stack([b["features"] for b in batch]),
                "labels": torch.stack([b["labels"] for b in batch])}
    width = max(len(b["input_ids"]) for b in batch)
    out: dict[str, torch.Tensor] = {
        "input_ids": torch.full((len(batch), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
    }
    if "loss_mask" in batch[0]:
        out["loss_mask"] = torch.zeros((len(batch), width))
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        out["input_ids"][i, :n] = b["input_ids"]
        out["attention_mask"][i, :n] = 1
        if "loss_mask" in b:
            out["loss_mask"][i, :n] = b["loss_mask"]
    if "labels" in batch[0]:
        out["labels"] = torch.stack([b["labels"] for b in batch])
    if "hidden" in batch[0]:  # cached hidden states (lora.top_layers), padded by 0
        out["hidden"] = torch.zeros((len(batch), width, batch[0]["hidden"].shape[-1]))
        for i, b in enumerate(batch):
            out["hidden"][i, :len(b["hidden"])] = b["hidden"]
    return out
