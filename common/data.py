"""A site's private data: reading, checking, tokenizing, partitioning (simulation).

Records are plain dicts read from JSONL, CSV or TSV. Classification records need a
text and a label column; causal-LM records a prompt and a response column. Every
problem (missing file, missing columns, empty data, unknown labels) is a
:class:`DataError` that names the file, the problem and the fix. The partitioners are
pure functions of sizes/labels/values and a seed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedtune.common import assets
from fedtune.common.config import (
    AUTO_LENGTH_CAP,
    AUTO_LENGTH_PERCENTILE,
    DataConfig,
    RunConfig,
)
from fedtune.common.errors import DataError

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


def read_records(source: str, *, required: Sequence[str]) -> list[Record]:
    """Read a JSONL / CSV / TSV file (or ``fedtune:NAME`` asset) into records."""
    path = Path(assets.resolve(source))
    if not path.is_file():
        raise DataError(f"{path}: data file not found; set data.source (simulation) "
                        "or the node's data-path to an existing .jsonl/.csv/.tsv file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            records = _read_jsonl(path)
        elif suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8") as fh:
                records = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv"
                                              else ","))
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, "
                            ".csv or .tsv")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err}); re-save it as UTF-8") from err
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV ({err})") from err
    if not records:
        raise DataError(f"{path}: no records; the file is empty")
    missing = [c for c in required if c not in records[0]]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; found {sorted(records[0])}. Rename "
            "the columns or set data.text_column / label_column / prompt_column / "
            "response_column")
    for i, rec in enumerate(records):
        empty = [c for c in required if rec.get(c) in (None, "")]
        if empty:
            raise DataError(
                f"{path}: record {i + 1} has empty {empty}; fill or drop it")
    return records


def _read_jsonl(path: Path) -> list[Record]:
    with open(path, encoding="utf-8") as fh:
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
        raise DataError(
            f"{source}: unknown label(s) {sorted(unknown)} in column {column!r}; "
            f"the run declares data.labels={list(labels)}. Add them there or fix "
            "the data")
    return [index[str(r[column])] for r in records]


# --- partitioning (pure) ----------------------------------------------------------

def iid_partition(n: int, *, num_parts: int, seed: int) -> list[list[int]]:
    """Shuffle ``range(n)`` and deal it into ``num_parts`` near-equal parts."""
    if n < num_parts:
        raise DataError(f"{n} records cannot fill {num_parts} sites; lower "
                        "federation.num_sites")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return [sorted(idx[i::num_parts]) for i in range(num_parts)]


def dirichlet_partition(labels: Sequence[int], *, num_parts: int, alpha: float,
                        seed: int, min_size: int = 2) -> list[list[int]]:
    """Label skew: each class is split over the parts by Dirichlet(alpha) shares.

    Redraws (up to 100 times) until every part has ``min_size`` records.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for y in sorted(by_class):
            idx = rng.permutation(by_class[y]).tolist()
            shares = rng.dirichlet([alpha] * num_parts)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int).tolist()
            for p, chunk in enumerate(np.split(np.array(idx, dtype=int), cuts)):
                parts[p].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise DataError(f"Dirichlet(alpha={alpha}) left a site with < {min_size} records "
                    "after 100 draws; raise data.dirichlet_alpha or lower num_sites")


def column_partition(values: Sequence[str], *, num_parts: int,
                     column: str = "the partition column") -> list[list[int]]:
    """Natural sites: whole groups of equal ``values`` go to one part.

    Groups are placed largest first on the part with the fewest records (ties by
    name), so the split is deterministic and every group stays on a single site.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        groups[str(v)].append(i)
    if len(groups) < num_parts:
        raise DataError(f"{column} has only {len(groups)} distinct values to split "
                        f"into {num_parts} sites; set federation.num_sites="
                        f"{len(groups)} or use data.partition: iid or dirichlet")
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for _, idx in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        min(parts, key=len).extend(idx)
    return [sorted(p) for p in parts]


def partition(records: Sequence[Record], cfg: DataConfig, *, num_parts: int,
              seed: int, label_col_ids: Sequence[int] | None = None
              ) -> list[list[int]]:
    """Split records into ``num_parts`` sites as ``cfg.partition`` says."""
    if cfg.partition == "iid":
        return iid_partition(len(records), num_parts=num_parts, seed=seed)
    if cfg.partition == "dirichlet":
        if label_col_ids is None:
            raise DataError("dirichlet partitioning needs labels (classification task)")
        return dirichlet_partition(label_col_ids, num_parts=num_parts,
                                   alpha=cfg.dirichlet_alpha, seed=seed)
    if cfg.partition_column not in records[0]:
        raise DataError(f"data.partition_column {cfg.partition_column!r} is not a "
                        f"column of the data; found {sorted(records[0])}")
    return column_partition([r[cfg.partition_column] for r in records],
                            num_parts=num_parts,
                            column=f"data.partition_column {cfg.partition_column!r}")


def partitions(records: Sequence[Record], cfg: DataConfig, *, task: str,
               num_parts: int, seed: int, source: str = "data") -> list[list[int]]:
    """Every simulated site's record indices into ``records`` (as
    :func:`site_records` splits them): compute once, then pass to each site."""
    recs = records[: cfg.max_records or None]
    ys = (label_ids(recs, column=cfg.label_column, labels=cfg.labels,
                    source=source) if task == "classification" else None)
    return partition(recs, cfg, num_parts=num_parts, seed=seed, label_col_ids=ys)


def site_records(records: Sequence[Record], cfg: DataConfig, *, task: str,
                 part: int, num_parts: int, seed: int, source: str = "data",
                 parts: Sequence[Sequence[int]] | None = None
                 ) -> tuple[list[Record], str]:
    """A site's records and name: simulation partition ``part`` of ``num_parts``
    (``num_parts`` 0: all of them, a deployed site's own file), capped at
    ``cfg.max_samples_per_site``. ``parts``: :func:`partitions` of ``records``,
    computed once for all the sites (None: computed here)."""
    recs, name = records[: cfg.max_records or None], source
    if num_parts > 0:
        if parts is None:
            parts = partitions(records, cfg, task=task, num_parts=num_parts,
                               seed=seed, source=source)
        recs, name = [recs[i] for i in parts[part]], f"partition {part}/{num_parts}"
    else:
        recs = list(recs)
    if cfg.max_samples_per_site:
        recs = recs[: cfg.max_samples_per_site]
    return recs, name


def split_validation(indices: Sequence[int], *, fraction: float, seed: int
                     ) -> tuple[list[int], list[int]]:
    """Hold out ``fraction`` of a site's records (at least one when > 0)."""
    idx = list(indices)
    if fraction <= 0 or len(idx) < 4:
        return idx, []
    random.Random(seed).shuffle(idx)
    k = max(1, int(len(idx) * fraction))
    return sorted(idx[k:]), sorted(idx[:k])


def simulated_sites(cfg: RunConfig, records: Sequence[Record] | None = None
                    ) -> list[tuple[str, int]]:
    """(name, training records) of every simulated site, exactly as the sites will
    split ``data.source`` (``records``: the file, already read); a missing or
    malformed file raises the same DataError as training."""
    d, seed = cfg.data, cfg.train.seed
    recs = records if records is not None else read_records(
        d.source, required=required_columns(cfg.model.task, d))
    out, n = [], cfg.federation.num_sites
    parts = partitions(recs, d, task=cfg.model.task, num_parts=n, seed=seed,
                       source=d.source)  # once: per site it is O(sites x records)
    for part in range(n):
        site, name = site_records(recs, d, task=cfg.model.task, part=part,
                                  num_parts=n, seed=seed, source=d.source,
                                  parts=parts)
        train, _ = split_validation(range(len(site)), fraction=d.val_fraction,
                                    seed=seed + part)
        out.append((name, len(train)))
    return out


def check_simulation_data(cfg: RunConfig) -> list[str]:
    """Pre-flight of a simulation's data, before any engine starts: read
    ``data.source`` and split it exactly as the simulated sites will (the same
    readers and errors as training), and read the test set.

    Returns warnings (a site holding several values of the partition column).
    """
    d, task, sites = cfg.data, cfg.model.task, cfg.federation.num_sites
    required = required_columns(task, d)
    recs = read_records(d.source, required=required)
    out = []
    if d.partition == "column" and d.partition_column in recs[0]:
        values = len({str(r[d.partition_column]) for r in recs})
        if values > sites:
            out.append(f"data.partition_column {d.partition_column!r} has {values} "
                       f"values for {sites} sites: each site holds the records of "
                       f"several values (federation.num_sites={values} gives one "
                       "value per site)")
    for name, train in simulated_sites(cfg, recs):
        if not train:
            raise DataError(f"{d.source}: {name} gets no training records; lower "
                            "federation.num_sites or add records")
    if not d.test_source:
        out.append("data.test_source is not set: no held-out evaluation of the "
                   "global model (only the sites' own validation splits); set "
                   "data.test_source to held-out records in the format of "
                   "data.source")
    else:
        try:
            test = read_records(d.test_source, required=required)
            if task == "classification":
                label_ids(test, column=d.label_column, labels=d.labels,
                          source=d.test_source)
        except DataError as err:
            raise DataError(f"{err} [this is data.test_source, the held-out test "
                            "set: point it at held-out records in the same format, "
                            "or set data.test_source='' to evaluate on the sites' "
                            "validation splits only]") from err
    if d.retention_source:
        try:
            read_records(d.retention_source, required=[d.retention_column])
        except DataError as err:
            raise DataError(f"{err} [this is data.retention_source, the general-text "
                            "retention set]") from err
    return out


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
