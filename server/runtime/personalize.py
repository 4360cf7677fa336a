"""The personalisation round: after the federation, every site fine-tunes the best
global adapter on its own data (:mod:`fedtune.client.personalize`) and reports,
on its own held-out split, the global adapter's scores and its personalised
copy's. Nothing but those scalars comes back; the table is written to
``RUN_DIR/personalization.json`` and the report shows it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from fedtune.common import records
from fedtune.common.config import RunConfig
from fedtune.server import rundir
from fedtune.server.runtime import checkpoint
from fedtune.server.runtime.stats import declined_words, failure_words
from fedtune.server.runtime.trained import resolve

logger = logging.getLogger(__name__)
METHOD = ("local fine-tuning of the best global adapter (FedAvg + FT) under DP-SGD, "
          "scored on each site's own held-out split")


def quality_keys(cfg: RunConfig) -> tuple[str, ...]:
    return ((records.EVAL_LOSS, records.ACCURACY, records.MACRO_F1)
            if cfg.model.task == "classification" else
            (records.EVAL_LOSS, records.PERPLEXITY))


def personalize(grid: Grid, *, cfg: RunConfig, run_dir: Path) -> dict[str, Any] | None:
    """Run the personalisation round (when ``train.personalize_epochs`` > 0) on
    every connected site; returns (and writes) the per-site table."""
    if not cfg.train.personalize_epochs:
        return None
    trained = resolve(run_dir)  # best, else final
    arrays = records.to_record(trained.tensors())
    conf = ConfigRecord({records.PERSONALIZE: 1,
                         records.SERVER_ROUND: trained.round})
    nodes = sorted(grid.get_node_ids())
    logger.info("personalisation: %d sites fine-tune round %d's adapter for %d "
                "epoch(s) (epsilon %g each, charged to their ledgers)", len(nodes),
                trained.round, cfg.train.personalize_epochs,
                cfg.privacy.personalize_epsilon)
    messages = [Message(content=RecordDict({records.ARRAYS: arrays,
                                            records.CONFIG: conf}),
                        dst_node_id=node, message_type=MessageType.EVALUATE)
                for node in nodes]
    sites: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    spent: dict[str, dict[str, Any]] = {}
    for reply in grid.send_and_receive(messages,
                                       timeout=cfg.federation.round_timeout):
        node = str(reply.metadata.src_node_id)
        if reply.has_error():
            reason = reply.error.reason or ""
            failed[node] = declined_words(reason) or failure_words(reason)
            continue
        m: dict[str, Any] = dict(reply.content.metric_records.get(records.METRICS,
                                                                 MetricRecord()))
        spent[node] = m
        sites[node] = {
            "records": int(m.get(records.NUM_EXAMPLES, 0)),
            "global": {k: float(m[records.GLOBAL + k]) for k in quality_keys(cfg)},
            "personalised": {k: float(m[records.PERSONAL + k])
                             for k in quality_keys(cfg)},
            "epsilon": m.get(records.PERSONAL_EPSILON),
            "epsilon_run": m.get(records.EPSILON),
            **({"site": records.site_name(int(m[records.PARTITION]))}
               if records.PARTITION in m else {})}
    late = [str(n) for n in nodes if str(n) not in sites and str(n) not in failed]
    result = {"method": METHOD, "round": trained.round,
              "epochs": cfg.train.personalize_epochs,
              "epsilon": cfg.privacy.personalize_epsilon if cfg.privacy.enabled
              else None, "sites": sites, "failed": failed, "late": late,
              "mean": _means(sites, quality_keys(cfg))}
    checkpoint.fold_epsilons(run_dir, spent, release="personalisation")
    (run_dir / rundir.PERSONALISATION).write_text(json.dumps(
        result, indent=2, allow_nan=False, default=_finite) + "\n")
    for line in table_lines(result):
        logger.info("%s", line)
    for node, why in failed.items():
        logger.warning("personalisation: node %s failed: %s", node, why)
    return result


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _means(sites: dict[str, dict[str, Any]], keys: tuple[str, ...]
           ) -> dict[str, dict[str, float]]:
    if not sites:
        return {}
    return {which: {k: sum(s[which][k] for s in sites.values()) / len(sites)
                    for k in keys} for which in ("global", "personalised")}


def table_lines(result: dict[str, Any]) -> list[str]:
    """The per-site table as text (the log and ``fedtune report``)."""
    keys = list(next(iter(result["sites"].values()))["global"]) if result[
        "sites"] else []
    head = f"{'site':<26} {'records':>7}  " + "  ".join(
        f"{k + ' g→p':>22}" for k in keys) + f"  {'ε':>6}"
    lines = [f"personalisation ({result['method']}), round {result['round']}:", head]
    for node, s in sorted(result["sites"].items(),
                          key=lambda kv: kv[1].get("site", kv[0])):
        name = f"{s.get('site', '')} {node}".strip()
        eps = s.get("epsilon")
        lines.append(f"{name[:26]:<26} {s['records']:>7}  " + "  ".join(
            f"{s['global'][k]:>10.4f} → {s['personalised'][k]:<9.4f}" for k in keys)
            + f"  {'-' if eps is None else format(eps, '.3f'):>6}")
    if result["mean"]:
        lines.append(f"{'mean':<26} {'':>7}  " + "  ".join(
            f"{result['mean']['global'][k]:>10.4f} → "
            f"{result['mean']['personalised'][k]:<9.4f}" for k in keys))
    return lines
