"""``fedtune audit``: an empirical check of what the accountant promises.

It plants canary records (random word strings with random labels) in the training
data: half of them ("in") go to the sites, half ("out") never do. It runs the
configured federation, loads the final global adapter and runs a loss-threshold
membership-inference attack twice: real training records vs. held-out records, and
in-canaries vs. out-canaries. It reports each attack's ROC AUC and the epsilon lower
bound the canary attack proves (Clopper-Pearson, 95 %), next to the accountant's
epsilon. A lower bound far below the accountant's is expected (the attack is weak
and the accountant is worst-case); a lower bound *above* it would be a bug.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedtune.common import data, loops, metrics
from fedtune.common.config import RunConfig, from_dict, to_dict
from fedtune.common.errors import ConfigError
from fedtune.common.model import load_adapter, load_tokenizer
from fedtune.server import rundir
from fedtune.server.runtime import checkpoint

logger = logging.getLogger(__name__)


def make_canaries(records: list[dict[str, Any]], cfg: RunConfig, *, count: int,
                  seed: int) -> list[dict[str, Any]]:
    """``count`` records of 16 random words from the data, with random labels."""
    rng = random.Random(seed)
    words = sorted({w for r in records[:500]
                    for w in re.findall(r"[A-Za-z]{3,}", str(r[cfg.data.text_column]))})
    template = dict(records[0])
    out = []
    for _ in range(count):
        rec = dict(template)
        rec[cfg.data.text_column] = " ".join(rng.choice(words) for _ in range(16))
        rec[cfg.data.label_column] = rng.choice(list(cfg.data.labels))
        if cfg.data.partition == "column":  # spread over the existing sites
            col = cfg.data.partition_column
            rec[col] = rng.choice(records)[col]
        out.append(rec)
    return out


def per_example_losses(model: torch.nn.Module, records: list[dict[str, Any]],
                       cfg: RunConfig, *, source: str) -> list[float]:
    """The global model's loss on each record (the attack's score is minus it)."""
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.gguf_file)
    ds = data.encode_for_task(records, tok, task=cfg.model.task, cfg=cfg.data,
                              source=source)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.train.eval_batch_size,
        collate_fn=lambda b: data.collate(b, pad_id=int(tok.pad_token_id)))
    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for batch in loader:
            out += loops.per_sample_loss(model, batch,
                                              task=cfg.model.task).tolist()
    return out


Train = Callable[[RunConfig, Path], Path]  # (config, run directory) -> run directory


def run_audit(cfg: RunConfig, *, out_dir: Path, train: Train, canaries: int = 100,
              max_records: int = 300) -> dict[str, Any]:
    """Plant canaries, train with ``train`` (the simulation driver, passed in by
    the caller: the server side never starts a federation itself), attack; write
    ``audit.json`` in ``out_dir``."""
    if not cfg.data.test_source:
        raise ConfigError("data.test_source: the audit needs held-out records (the "
                          "non-members); set it to a file the sites never train on")
    if cfg.model.task != "classification":
        raise ConfigError("model.task: the audit's canaries are classification "
                          "records; causal-lm audits are not supported yet")
    req = data.required_columns(cfg.model.task, cfg.data)
    site_records = data.read_records(cfg.data.source, required=req)
    test = data.read_records(cfg.data.test_source, required=req)
    planted = make_canaries(site_records, cfg, count=2 * canaries, seed=cfg.train.seed)
    inside, outside = planted[:canaries], planted[canaries:]
    out_dir.mkdir(parents=True, exist_ok=True)
    augmented = out_dir / "train-with-canaries.jsonl"
    augmented.write_text("".join(json.dumps(r) + "\n" for r in site_records + inside),
                         encoding="utf-8")
    raw = to_dict(cfg)
    run_cfg = from_dict({**raw, "data": {**raw["data"], "source": str(augmented)}})
    run_dir = train(run_cfg, out_dir / "run")
    model = load_adapter(cfg.model, run_dir / rundir.FINAL,
                         num_labels=len(cfg.data.labels))
    rows = checkpoint.read_metrics(run_dir)
    members, nonmembers = site_records[:max_records], test[:max_records]

    def scores(recs: list[dict[str, Any]], source: str) -> list[float]:
        return [-x for x in per_example_losses(model, recs, cfg, source=source)]

    s_in, s_out = scores(inside, "canaries"), scores(outside, "canaries")
    s_mem, s_non = scores(members, cfg.data.source), scores(nonmembers, "test")
    eps_acc = rows[-1].get("epsilon_max") if rows else None
    result = {
        "dp": cfg.privacy.enabled, "accountant_epsilon": eps_acc,
        "delta": cfg.privacy.target_delta, "canaries_in": len(s_in),
        "canaries_out": len(s_out), "members": len(s_mem), "nonmembers": len(s_non),
        "auc_canaries": metrics.membership_auc(s_in, s_out),
        "auc_records": metrics.membership_auc(s_mem, s_non),
        "empirical_epsilon_canaries": metrics.empirical_epsilon(
            s_in, s_out, delta=cfg.privacy.target_delta),
        "empirical_epsilon_records": metrics.empirical_epsilon(
            s_mem, s_non, delta=cfg.privacy.target_delta),
        "final_eval_accuracy": rows[-1].get("eval_accuracy") if rows else None,
        "run_dir": str(run_dir),
    }
    (out_dir / "audit.json").write_text(json.dumps(result, indent=2))
    return result
