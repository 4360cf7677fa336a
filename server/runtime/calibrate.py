"""The decision calibration after the last round (``train.calibrate_decisions``).

The server asks every site that trained a round for the class histogram it
released under DP for its logit adjustment (post-processing, no further cost) and
sums the federation's prior. It sends the final global adapter (the best round
where one was selected) with candidate decision biases ``s * log(prior)``; each
site replies with its validation split's counts under DP
(:mod:`fedtune.client.calibrate`). The server sums them, estimates each
candidate's per-class precision, recall and macro-F1
(:mod:`fedtune.common.calibration`) and keeps the best one: it goes into the
adapter's ``fedtune_model.json`` (``fedtune predict``, ``evaluate`` and ``export``
apply it) and into that round's line of ``metrics.jsonl``, with every candidate's
held-out scores beside it for the report. The held-out set is scored for the
record only: the choice is made on the sites' validation counts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from fedtune.common import accounting, calibration, records
from fedtune.common.config import RunConfig
from fedtune.common.model import FEDTUNE_META, adapter_state
from fedtune.server.runtime import checkpoint
from fedtune.server.runtime.central_eval import CentralEvaluator
from fedtune.server.runtime.stats import failure_words
from fedtune.server.runtime.trained import resolve

logger = logging.getLogger(__name__)


def _ask(grid: Grid, nodes: list[int], *, content: RecordDict, kind: str,
         timeout: float) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Send ``content`` to every node; the replies' metrics and the failures."""
    messages = [Message(content=content, dst_node_id=node, message_type=kind)
                for node in nodes]
    got: dict[int, dict[str, Any]] = {}
    failed: dict[int, str] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            failed[node] = failure_words(reply.error.reason or "")
            continue
        got[node] = dict(reply.content.metric_records.get(records.METRICS,
                                                          MetricRecord()))
    return got, failed


def federation_prior(grid: Grid, nodes: list[int], *, num_classes: int,
                     timeout: float) -> list[float] | None:
    """The prior of the sites' summed released class histograms (None: no site
    answered)."""
    ask = RecordDict({records.CONFIG: ConfigRecord({records.QUERY:
                                                    records.CLASS_COUNTS})})
    got, failed = _ask(grid, nodes, content=ask, kind=MessageType.QUERY,
                       timeout=timeout)
    for node, why in failed.items():
        logger.warning("calibration: node %s sent no class histogram: %s", node, why)
    total = np.zeros(num_classes, np.float64)
    n = 0
    for m in got.values():
        counts = m.get(records.CLASS_COUNTS)
        if isinstance(counts, list) and len(counts) == num_classes:
            total += np.asarray(counts, np.float64)
            n += 1
    return accounting.class_prior(total.tolist()) if n else None


def trained_nodes(grid: Grid, run_dir: Path) -> list[int]:
    """The connected sites that trained a round of this run (only they released a
    class histogram; with 100 of 10,000 sites sampled a round, asking the others
    would wake every virtual site); every connected site when the run recorded
    none."""
    connected = set(grid.get_node_ids())
    replied = {int(n) for row in checkpoint.read_metrics(run_dir)
               for n in row.get("nodes_replied") or ()}
    return sorted(connected & replied if replied else connected)


def calibrate(grid: Grid, *, cfg: RunConfig, run_dir: Path,
              evaluator: CentralEvaluator) -> dict[str, Any] | None:
    """Run the calibration (when the run calibrates); returns what it recorded."""
    if cfg.classifies and cfg.train.calibrate_decisions and not cfg.calibrates:
        logger.warning("train.calibrate_decisions is ignored: train.logit_adjustment"
                       " is 0, so there is no adjustment to calibrate (no release, "
                       "no epsilon spent on it)")
    if not cfg.calibrates:
        return None
    trained = resolve(run_dir)
    nodes = trained_nodes(grid, run_dir)
    k = len(cfg.data.labels)
    timeout = cfg.federation.round_timeout
    prior = federation_prior(grid, nodes, num_classes=k, timeout=timeout)
    if prior is None:
        logger.warning("calibration skipped: no site answered with its class "
                       "histogram; the decisions stay balanced (strength 0)")
        return None
    tau = cfg.logit_adjustment
    strengths = [f * tau for f in calibration.STRENGTHS] if tau > 0 else [0.0]
    biases = calibration.candidate_biases(prior, strengths)
    tensors = trained.tensors()
    conf = ConfigRecord({records.CALIBRATE: 1, records.SERVER_ROUND: trained.round,
                         records.DECISION_BIASES: [float(v) for v in biases.ravel()]})
    logger.info("calibration: %d sites score %d decision biases on their "
                "validation splits (round %d's adapter, counts under DP, noise %g)",
                len(nodes), len(strengths), trained.round,
                cfg.calibration_sigma)
    got, failed = _ask(grid, nodes, content=RecordDict({
        records.ARRAYS: records.to_record(tensors), records.CONFIG: conf}),
        kind=MessageType.EVALUATE, timeout=timeout)
    total = np.zeros(calibration.release_shape(len(strengths), k), np.float64)
    used, val_records, spent = 0, 0, []
    for node, m in got.items():
        flat = m.get(records.CALIBRATION_COUNTS)
        if not isinstance(flat, list) or len(flat) != total.size:
            failed[node] = "sent malformed calibration counts"
            continue
        total += np.asarray(flat, np.float64).reshape(total.shape)
        used += 1
        val_records += int(m.get(records.NUM_EXAMPLES, 0))
        if isinstance(m.get(records.EPSILON), int | float):
            spent.append(float(m[records.EPSILON]))  # the run's, with this release
    for node, why in failed.items():
        logger.warning("calibration: node %s failed: %s", node, why)
    if not used:
        logger.warning("calibration skipped: no site returned its counts; the "
                       "decisions stay balanced (strength 0)")
        return None
    counts = calibration.to_counts(total, biases)
    found = calibration.estimates(counts, strengths)
    # the summed release's noise: each site's z * sensitivity, independent
    z = cfg.calibration_sigma if cfg.privacy.enabled else 0.0
    noise_sd = z * calibration.sensitivity(len(strengths), k) * float(np.sqrt(used))
    minority = int(np.argmin(prior))
    if k == 2:  # the minority predicted as often as it occurs (P = R)
        best = found[calibration.balance_point(counts, minority)]
        margin = None
    else:  # two candidates' estimates differ by noise of about sqrt(2) x one's
        margin = float(np.sqrt(2)) * max(
            calibration.macro_f1_sd(counts, i, noise_sd=noise_sd)
            for i in range(len(strengths)))
        best = calibration.choose(found, margin=margin)
    checkpoint.fold_epsilons(run_dir, {str(n): m for n, m in got.items()},
                             release="calibration")
    state = {**adapter_state(evaluator.model), **tensors}
    held_out = [_scores(evaluator, state, bias) for bias in biases]
    chosen = strengths.index(best.strength)
    result: dict[str, Any] = {
        "round": trained.round, "strength": best.strength,
        "logit_adjustment": tau, "effective_adjustment": tau - best.strength,
        "sites": used, "failed": {str(n): w for n, w in failed.items()},
        "validation_records": val_records,
        "noise_multiplier": z,
        "release": calibration.release_name(k),
        "epsilon_max": max(spent) if spent else None,
        "margin": margin,  # many classes: the gain over strength 0 a move needed
        "rule": "balance" if k == 2 else "macro-f1",
        "excess": (calibration.excess(counts, minority).tolist()
                   if k == 2 else None),
        "prior": prior, "decision_bias": biases[chosen].tolist(),
        "candidates": [{"strength": e.strength, "val_macro_f1": e.macro_f1,
                        "val_macro_f1_smoothed": sm,
                        "val_precision": e.precision, "val_recall": e.recall,
                        "test": h}
                       for e, sm, h in zip(found, calibration.smoothed(found),
                                           held_out, strict=True)],
        "eval": held_out[chosen]}
    result = _finite(result)
    _write_bias(trained.adapter, result)
    checkpoint.amend_metrics(run_dir, trained.round, {"calibration": result})
    for line in table_lines(result):
        logger.info("%s", line)
    return result


def _scores(evaluator: CentralEvaluator, state: dict[str, torch.Tensor],
            bias: np.ndarray) -> dict[str, Any]:
    """The held-out scores with decision bias ``bias`` (for the record only: loss,
    accuracy, macro-F1, per-class precision, recall and F1)."""
    ev = evaluator(state, logit_bias=torch.tensor(bias, dtype=torch.float32))
    return {key: v for key, v in ev.items() if isinstance(v, int | float)}


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (a class never predicted)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _write_bias(adapter: Path, result: dict[str, Any]) -> None:
    """The chosen bias into the adapter's ``fedtune_model.json`` (atomically)."""
    path = adapter / FEDTUNE_META
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta.update({"decision_bias": result["decision_bias"],
                 "decision_bias_strength": result["strength"]})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


def table_lines(result: dict[str, Any]) -> list[str]:
    """The candidates as text (the log and ``fedtune report``)."""
    lines = [f"decision calibration on {result['validation_records']} validation "
             f"records of {result['sites']} sites ({result.get('release', 'counts')} "
             "under DP): "
             + ("the minority predicted as often as it occurs, " if
                result.get("rule") == "balance" else "")
             + "strength "
             f"{result['strength']:g} of the logit adjustment "
             f"{result['logit_adjustment']:g} (decisions at tau "
             f"{result['effective_adjustment']:g}); the sites' epsilon after it: "
             f"max {_num(result.get('epsilon_max'))}",
             f"{'strength':>8} {'tau':>5} {'val macro-F1 (DP)':>18} "
             f"{'smoothed':>9} {'held-out macro-F1':>18} {'accuracy':>9}"
             + ("  minority predicted - in it (DP)" if result.get("excess") else "")]
    excess = result.get("excess") or [None] * len(result["candidates"])
    for c, over in zip(result["candidates"], excess, strict=True):
        mark = "  <- chosen" if c["strength"] == result["strength"] else ""
        test = c["test"]
        tau = result["logit_adjustment"] - c["strength"]
        lines.append(f"{c['strength']:>8g} {tau:>5g} {c['val_macro_f1']:>18.3f} "
                     f"{_num(c.get('val_macro_f1_smoothed')):>9} "
                     f"{_num(test.get('macro-f1')):>18} "
                     f"{_num(test.get('accuracy')):>9}"
                     + ("" if over is None else f"  {over:>+31.0f}") + mark)
    return lines


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"
