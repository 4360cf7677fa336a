"""What a site holds between messages: its data, its model and its ledger.

A simulation's Ray actors and a deployed site's worker
(:mod:`fedtune.client.node.worker`)
keep these across rounds: the tokenized data (read again when the file changes on
disk), one model resident on its device (reset to its seeded initial adapter for
every message; rebuilt when the weights change on disk) and the privacy ledger.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.client import ledger
from fedtune.client.releases import Book
from fedtune.common import data, sites
from fedtune.common.config import RunConfig
from fedtune.common.data import EncodedDataset
from fedtune.common.errors import DataError, FedtuneError
from fedtune.common.model import (
    adapter_state,
    base_loads,
    build_model,
    load_tokenizer,
    set_adapter_state,
    set_adapter_trainable,
    stamp,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteData:
    """A site's tokenized private data, split into train and validation."""

    train: EncodedDataset
    val: EncodedDataset
    name: str
    fingerprint: str = ""
    records: int = 0


@functools.lru_cache(maxsize=2)
def _source(cfg: RunConfig, source: str, num_parts: int, stamp: tuple[int, ...]
            ) -> tuple[list[data.Record], list[list[int]] | None]:
    """A data file's records and (simulation) partitions, once per process and
    file version: a Ray actor that serves a new sampled site each round slices
    them instead of reading and partitioning the whole file again."""
    recs = data.read_records(source, required=data.required_columns(cfg.model.task,
                                                                    cfg.data))
    parts = sites.partitions(recs, cfg.data, task=cfg.model.task, num_parts=num_parts,
                            seed=cfg.train.seed, source=source) if num_parts else None
    return recs, parts


@functools.lru_cache(maxsize=16)
def _site_data(cfg: RunConfig, source: str, part: int, num_parts: int,
               stamp: tuple[int, ...]) -> SiteData:
    """Read, split and tokenize once per file version (``stamp``: a changed file on
    disk is read again)."""
    recs, parts = _source(cfg, source, num_parts, stamp)
    recs, name = sites.site_records(
        recs, cfg.data, task=cfg.model.task, part=part, num_parts=num_parts,
        seed=cfg.train.seed, source=source, parts=parts)
    tr, va = sites.site_split(len(recs), cfg, part=part)
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.gguf_file)
    fitted = data.fit_length(recs, tok, task=cfg.model.task, cfg=cfg.data,
                             source=name)  # one token limit for train and val

    def enc(idx: list[int]) -> EncodedDataset:
        return data.encode_for_task([recs[i] for i in idx], tok, task=cfg.model.task,
                                    cfg=fitted, source=source)

    return SiteData(train=enc(tr), val=enc(va), name=name,
                    fingerprint=ledger.fingerprint(recs), records=len(recs))


def site_data(cfg: RunConfig, node_config: Mapping[str, Any]) -> SiteData:
    """This node's data: its own file, or its simulation partition."""
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        return _site_data(cfg, path, 0, 0, data.file_stamp(path))
    if "partition-id" in node_config:
        return _site_data(cfg, cfg.data.source, int(node_config["partition-id"]),
                          int(node_config["num-partitions"]),
                          data.file_stamp(cfg.data.source))
    raise DataError("this node has no data: start the SuperNode with "
                    "--node-config \"data-path='/path/to/site.jsonl'\"")


def site_ledger(cfg: RunConfig, node_config: Mapping[str, Any], site: SiteData
                ) -> Book | None:
    """The site's ledger and budget: the daemon's (deployment) or the simulation's."""
    if "ledger-dir" in node_config:
        directory = Path(str(node_config["ledger-dir"]))
        eps = float(node_config.get("budget-epsilon", 0.0)) or math.inf
        delta = float(node_config.get("budget-delta", cfg.privacy.target_delta))
    elif cfg.privacy.ledger_dir:
        directory = Path(cfg.privacy.ledger_dir)
        eps = cfg.privacy.budget_epsilon or math.inf
        delta = cfg.privacy.target_delta
    else:
        return None
    return Book(
        ledger.PrivacyLedger(directory, site.fingerprint, records=site.records,
                             accountant=cfg.privacy.accountant),
        ledger.Budget(epsilon=eps, delta=delta))



def site_rank(cfg: RunConfig, node_config: Mapping[str, Any]) -> int:
    """This site's LoRA rank: the daemon's ``--lora-rank``, the simulation's
    ``lora.site_ranks`` by partition, else the run's ``lora.r``."""
    rank = int(node_config.get("lora-rank", 0))
    if not rank and cfg.lora.site_ranks and "partition-id" in node_config:
        ranks = cfg.lora.site_ranks
        rank = ranks[int(node_config["partition-id"]) % len(ranks)]
    if rank > cfg.lora.r:
        raise FedtuneError(f"this site's LoRA rank {rank} exceeds the run's lora.r="
                           f"{cfg.lora.r}; start the daemon with --lora-rank <= "
                           f"{cfg.lora.r}")
    return rank or cfg.lora.r


@dataclass
class _Resident:
    """The one model this process keeps on its device, and its initial adapter."""

    key: tuple[Any, ...]
    model: torch.nn.Module
    initial: dict[str, torch.Tensor]


_RESIDENT: list[_Resident] = []  # at most one (a GPU holds one copy)
_BUILT = [0]
_OPACUS_ATTRS = ("grad_sample", "_forward_counter", "summed_grad")


def resident_model(cfg: RunConfig, *, rank: int, device: torch.device
                   ) -> torch.nn.Module:
    """This site's model with its initial adapter, on ``device``.

    Built once per model, LoRA shape, seed and version of the weights on disk, then
    kept (on the GPU, when there is one) and reset to the seeded initial adapter
    for every message: exactly the state a fresh build gives, without the copy and
    the host-to-device transfer.
    """
    key = (cfg.model, cfg.lora, len(cfg.data.labels), cfg.train.seed, rank,
           str(device), stamp(cfg.model.name_or_path, cfg.model.gguf_file))
    if _RESIDENT and _RESIDENT[0].key == key:
        held = _RESIDENT[0]
        set_adapter_state(held.model, held.initial)
        set_adapter_trainable(held.model, cfg.lora, trainable=True)
        for param in held.model.parameters():
            param.grad = None
            for attr in _OPACUS_ATTRS:
                if hasattr(param, attr):
                    delattr(param, attr)
        return held.model
    _RESIDENT.clear()  # free the old one before the new one is built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build_model(cfg.model, cfg.lora, num_labels=len(cfg.data.labels),
                        seed=cfg.train.seed, rank=rank).to(device)
    _RESIDENT.append(_Resident(key, model, adapter_state(model)))
    _BUILT[0] += 1
    return model


def load_counts() -> dict[str, int]:
    """How often this process read the base model and the site data from disk, and
    built the resident model (the site worker reports them)."""
    return {"model_loads": base_loads(),
            "data_loads": _site_data.cache_info().misses,
            "models_built": _BUILT[0]}
