"""``fedtune compare RUN_DIR RUN_DIR [...]``: runs side by side, and whether their
macro-F1 difference is more than the test set's sampling noise.

For each run: the final and the best round's macro-F1 (metrics.jsonl), ε, the
bytes exchanged and the wall time of its rounds. Then every run's model as
``fedtune predict`` serves it (the best round, with its calibrated decision bias)
scores the common held-out set again, record by record: per-class F1 side by side,
and for each run against the first a paired bootstrap interval of the macro-F1
difference (:func:`fedtune.common.metrics.paired_bootstrap_macro_f1`). Runs scored
on different test sets, or on none, are refused by name. The interval covers the
test records' sampling only; a DP run's own noise shows between repeated runs
(bench/recipe_map.py reports their spread).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common import data, metrics
from fedtune.common.errors import FedtuneError
from fedtune.server.tools.predict import Predictor
from fedtune.server.tools.runs import Run, best_round, load_run


@dataclass(frozen=True)
class TestSet:
    """A run's held-out set: where it comes from and a digest of its records."""

    source: str
    records: list[dict[str, Any]]
    digest: str

    def describe(self) -> str:
        return f"{self.source} ({len(self.records)} records, sha256 {self.digest[:12]})"


def test_set(run: Run) -> TestSet:
    """The held-out records the run was scored on (``data.test_source``, its first
    ``max_test_samples``)."""
    cfg = run.cfg
    if not cfg.data.test_source:
        raise FedtuneError(f"{run.path}: has no test set (data.test_source is empty), "
                           "so there is nothing to compare it on; compare runs "
                           "scored on one held-out set")
    recs = data.read_records(cfg.data.test_source, required=data.required_columns(
        cfg.model.task, cfg.data))
    recs = recs[: cfg.data.max_test_samples or None]
    h = hashlib.sha256()
    for r in recs:
        for col in data.required_columns(cfg.model.task, cfg.data):
            h.update(str(r[col]).encode() + b"\0")
    return TestSet(cfg.data.test_source, recs, h.hexdigest())


def _summary(run: Run) -> dict[str, Any]:
    rows = run.rows
    if not rows:
        raise FedtuneError(f"{run.path}: no round completed, nothing to compare")
    best = best_round(run)
    best_row = next((r for r in rows if r["round"] == best), rows[-1])
    return {
        "run": str(run.path), "rounds": rows[-1]["round"], "best_round": best,
        "final_macro_f1": rows[-1].get("eval_macro_f1"),
        "best_macro_f1": best_row.get("eval_macro_f1"),
        "final_perplexity": rows[-1].get("eval_perplexity"),
        # what the run spent in all: the rounds, then the decision calibration
        "epsilon": max((float(v) for v in (
            rows[-1].get("epsilon_max"),
            *((r.get("calibration") or {}).get("epsilon_max") for r in rows))
            if v is not None), default=None),
        "bytes": sum(int(r.get("bytes_received", 0)) + int(r.get("bytes_sent", 0))
                     for r in rows),
        "wall_seconds": sum(float(r.get("round_seconds", 0.0)) for r in rows),
    }


def _predictions(run: Run, texts: list[str], device: str) -> list[int]:
    probs = Predictor.open(run.path, device=device).all_probabilities(texts)
    return list(probs.argmax(-1).tolist())


def compare(run_dirs: list[str | Path], *, resamples: int = 2000,
            device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """The comparison as a dict (``runs``, ``per_class``, ``differences``)."""
    if len(run_dirs) < 2:
        raise FedtuneError("fedtune compare needs two run directories or more")
    runs = [load_run(d) for d in run_dirs]
    sets = [test_set(r) for r in runs]
    for run, ts in zip(runs[1:], sets[1:], strict=True):
        if ts.digest != sets[0].digest:
            raise FedtuneError(
                f"{run.path} was scored on {ts.describe()}, {runs[0].path} on "
                f"{sets[0].describe()}: a paired comparison needs one test set")
    out: dict[str, Any] = {"test_set": sets[0].describe(),
                           "runs": [_summary(r) for r in runs],
                           "per_class": {}, "differences": []}
    cfg = runs[0].cfg
    if cfg.model.task != "classification":
        return out  # a causal LM: its perplexities side by side, no F1 to bootstrap
    labels = list(cfg.data.labels)
    if any(list(r.cfg.data.labels) != labels for r in runs):
        raise FedtuneError("the runs classify different label sets: "
                           + "; ".join(f"{r.path}: {list(r.cfg.data.labels)}"
                                       for r in runs))
    truth = data.label_ids(sets[0].records, column=cfg.data.label_column,
                           labels=labels, source=sets[0].source)
    texts = [str(r[cfg.data.text_column]) for r in sets[0].records]
    preds = [_predictions(r, texts, device) for r in runs]
    for summary, pred in zip(out["runs"], preds, strict=True):
        summary["scored_macro_f1"] = metrics.macro_f1(truth, pred,
                                                      num_classes=len(labels))
    out["per_class"] = {
        name: [f[i] for f in (metrics.per_class_f1(truth, p, num_classes=len(labels))
                              for p in preds)]
        for i, name in enumerate(labels)}
    for run, pred in zip(runs[1:], preds[1:], strict=True):
        diff, lo, hi = metrics.paired_bootstrap_macro_f1(
            truth, pred, preds[0], num_classes=len(labels), resamples=resamples,
            seed=seed)
        out["differences"].append({"run": str(run.path), "against": str(runs[0].path),
                                   "macro_f1_diff": diff, "low": lo, "high": hi,
                                   "resamples": resamples})
    return out


def _cell(v: Any, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def lines(result: dict[str, Any]) -> list[str]:
    """The comparison as text."""
    runs = result["runs"]
    names = [f"[{i + 1}]" for i in range(len(runs))]
    out = [f"{n} {r['run']}" for n, r in zip(names, runs, strict=True)]
    out.append(f"test set: {result['test_set']}")
    width = max(28, *(len(k) for k in result["per_class"]))
    head = f"{'':<{width}}" + "".join(f"{n:>12}" for n in names)
    out += ["", head]
    rows = [("rounds (best)", [f"{r['rounds']} ({r['best_round']})" for r in runs]),
            ("macro-F1 final", [_cell(r["final_macro_f1"]) for r in runs]),
            ("macro-F1 best round", [_cell(r["best_macro_f1"]) for r in runs])]
    if any("scored_macro_f1" in r for r in runs):
        rows.append(("macro-F1 as predict serves",
                     [_cell(r.get("scored_macro_f1")) for r in runs]))
    if any(r["final_perplexity"] is not None for r in runs):
        rows.append(("perplexity final",
                     [_cell(r["final_perplexity"], ".2f") for r in runs]))
    rows += [("epsilon", [_cell(r["epsilon"], ".2f") for r in runs]),
             ("MB exchanged", [f"{r['bytes'] / 1e6:.1f}" for r in runs]),
             ("wall s (rounds)", [f"{r['wall_seconds']:.0f}" for r in runs])]
    out += [f"{k:<{width}}" + "".join(f"{v:>12}" for v in vs) for k, vs in rows]
    if result["per_class"]:
        out += ["", f"{'F1 per class (as predict serves)':<{width}}"]
        out += [f"{k[:width]:<{width}}" + "".join(f"{_cell(v):>12}" for v in vs)
                for k, vs in result["per_class"].items()]
    for d, n in zip(result["differences"], names[1:], strict=True):
        verdict = ("no difference beyond the test set's noise" if d["low"] <= 0 <=
                   d["high"] else ("better" if d["low"] > 0 else "worse"))
        out.append(f"{n} - [1] macro-F1: {d['macro_f1_diff']:+.4f}, 95% paired "
                   f"bootstrap CI [{d['low']:+.4f}, {d['high']:+.4f}] "
                   f"({d['resamples']} resamples): {verdict}")
    return out
