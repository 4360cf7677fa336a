"""Hyper-parameter search over simulations: ``fedtune sweep CONFIG --trials N``.

The run YAML declares its search space in a ``sweep`` section (ignored by every
other command)::

    sweep:
      metric: eval_macro_f1          # a metrics.jsonl key, read every round
      direction: maximize            # or minimize
      space:
        train.learning_rate: {low: 1.0e-3, high: 1.0e-1, log: true}
        train.batch_size: {choices: [256, 512, 1024]}
        train.linear_probe_rounds: {low: 1, high: 3}

Optuna's TPE sampler proposes each trial's values; every trial is an ordinary
``fedtune simulate`` run in its own run directory (``SWEEP_DIR/trial-NNN``), and a
trial whose per-round metric falls below the median of the earlier trials at the
same round is pruned (its simulation is stopped). The table of trials goes to
``SWEEP_DIR/trials.json`` and the console; the best trial's resolved config to
``SWEEP_DIR/best.yaml``.

Tuning on private data spends privacy: every trial is another release of every
site's data. Sweep on simulations of public or proxy data, then run the chosen
config once on the real sites.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from fedtune.common import config
from fedtune.common.errors import ConfigError, FedtuneError
from fedtune.server.runtime import checkpoint

logger = logging.getLogger(__name__)
SPEC_KEYS = {"low", "high", "log", "choices"}


@dataclass(frozen=True)
class Param:
    """One searched key: a numeric range, or a list of choices."""

    key: str  # section.field (snake or kebab case)
    kind: type  # int, float, or the field's type for choices
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Space:
    """What to search, and what to optimise."""

    metric: str
    direction: str
    params: tuple[Param, ...]


def _field_type(key: str) -> type:
    section, _, name = key.partition(".")
    name = name.replace("-", "_")
    cls = config.SECTIONS.get(section)
    hints = typing.get_type_hints(cls) if cls else {}
    if cls is None or name not in {f.name for f in fields(cls)}:  # type: ignore[arg-type]  # a dataclass
        raise ConfigError(f"sweep.space.{key}: unknown key; use section.key as in "
                          "the run YAML, e.g. train.learning_rate")
    hint = hints[name]
    return hint if hint in (int, float, bool, str) else object


def _param(key: str, spec: Any) -> Param:
    kind = _field_type(key)
    where = f"sweep.space.{key}"
    if not isinstance(spec, Mapping) or not spec or set(spec) - SPEC_KEYS:
        raise ConfigError(f"{where}: expected {{low, high[, log]}} or {{choices: "
                          f"[...]}}, got {spec!r}")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices: expected a non-empty list")
        return Param(key, kind, choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    if kind not in (int, float):
        raise ConfigError(f"{where}: a range needs a numeric key; use choices for "
                          f"{kind.__name__ if kind is not object else 'this'} keys")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool)
                  for v in (low, high))
    if not numbers or (kind is int and not all(isinstance(v, int)
                                               for v in (low, high))):
        raise ConfigError(f"{where}: low and high must be "
                          f"{'integers' if kind is int else 'numbers'}, got "
                          f"{low!r} and {high!r}")
    assert isinstance(low, int | float) and isinstance(high, int | float)
    if not low < high:
        raise ConfigError(f"{where}: empty range: low {low!r} must be < high {high!r}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low!r}")
    return Param(key, kind, low=float(low), high=float(high), log=log)


def load_space(raw: Mapping[str, Any]) -> Space:
    """The ``sweep`` section of a run YAML, checked before any trial starts."""
    sweep = raw.get("sweep")
    if not isinstance(sweep, Mapping):
        raise ConfigError("sweep: the config has no sweep section; add one with "
                          "metric, direction and space (see fedtune sweep --help)")
    unknown = sorted(set(sweep) - {"metric", "direction", "space"})
    if unknown:
        raise ConfigError(f"sweep: unknown key(s) {unknown}; known: metric, "
                          "direction, space")
    metric = str(sweep.get("metric", "eval_macro_f1"))
    direction = str(sweep.get("direction", "maximize"))
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"sweep.direction: expected maximize or minimize, got "
                          f"{direction!r}")
    space = sweep.get("space")
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("sweep.space: expected a mapping of section.key to a "
                          "range or choices")
    return Space(metric, direction, tuple(_param(str(k), v) for k, v in space.items()))


def _overrides(values: Mapping[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def check_corners(base: Path, space: Space) -> None:
    """Every bound and every choice must give a valid config (a batch size of 0,
    a probe round count above num_rounds... are refused now, not in trial 7)."""
    for p in space.params:
        values = p.choices or ((int(p.low), int(p.high)) if p.kind is int
                               else (p.low, p.high))
        for v in values:
            try:
                config.load(base, _overrides({p.key: v}))
            except ConfigError as err:
                raise ConfigError([f"sweep.space.{p.key}={v!r}: {e}"
                                   for e in err.problems]) from err


def _suggest(trial: Any, p: Param) -> Any:
    if p.choices:
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.kind is int:
        return trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
    return trial.suggest_float(p.key, p.low, p.high, log=p.log)


def _metric(run_dir: Path, metric: str) -> dict[int, float]:
    """The metric by round (round > 0) as far as metrics.jsonl has it."""
    try:
        rows = checkpoint.read_metrics(run_dir)
    except FedtuneError:  # a line being written right now: read it next time
        return {}
    return {int(r["round"]): float(r[metric]) for r in rows
            if r.get("round", 0) > 0 and isinstance(r.get(metric), int | float)}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a trial's simulation and everything it started (Ray's workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def run_trial(base: Path, values: Mapping[str, Any], *, run_dir: Path, metric: str,
              report: Any, timeout: float) -> tuple[str, dict[int, float]]:
    """One simulation; ``report(round, value)`` returns True to prune it.
    Returns (``complete`` | ``pruned`` | ``failed``, the metric by round)."""
    cmd = [sys.executable, "-m", "fedtune.simulations.cli", "simulate", str(base),
           *_overrides(values), "--run-dir", str(run_dir)]
    log = open(run_dir.parent / f"{run_dir.name}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                _stop(proc)
                return "failed", seen
            for rnd, value in sorted(_metric(run_dir, metric).items()):
                if rnd not in seen:
                    seen[rnd] = value
                    if report(rnd, value):
                        _stop(proc)
                        return "pruned", seen
            time.sleep(2.0)
        seen.update(_metric(run_dir, metric))
        return ("complete" if proc.returncode == 0 and seen else "failed"), seen
    finally:
        if proc.poll() is None:
            _stop(proc)
        log.close()


def sweep(base: Path, *, trials: int, out: Path, seed: int = 0,
          timeout: float = 3600.0) -> list[dict[str, Any]]:
    """Run the search; returns one row per trial (also in ``out/trials.json``)."""
    try:
        import optuna
    except ImportError as err:
        raise FedtuneError("fedtune sweep needs Optuna: pip install -e '.[sweep]'"
                           ) from err
    raw = yaml.safe_load(base.read_text(encoding="utf-8")) or {}
    space = load_space(raw)
    config.load(base)  # the base config itself must be valid
    check_corners(base, space)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction=typing.cast(typing.Literal["minimize", "maximize"],
                              space.direction),
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    rows: list[dict[str, Any]] = []
    for number in range(trials):
        trial = study.ask()
        values = {p.key: _suggest(trial, p) for p in space.params}
        run_dir = out / f"trial-{number:03d}"

        def report(rnd: int, value: float, trial: Any = trial) -> bool:
            trial.report(value, rnd)
            return bool(trial.should_prune())

        logger.info("trial %d: %s", number, " ".join(_overrides(values)))
        state, by_round = run_trial(base, values, run_dir=run_dir,
                                    metric=space.metric, report=report,
                                    timeout=timeout)
        final = by_round[max(by_round)] if by_round else math.nan
        if state == "complete":
            study.tell(trial, final)
        else:
            study.tell(trial, state=(optuna.trial.TrialState.PRUNED if
                                     state == "pruned" else
                                     optuna.trial.TrialState.FAIL))
        rows.append({"trial": number, "state": state, "params": values,
                     space.metric: None if math.isnan(final) else final,
                     "rounds": len(by_round), "run_dir": str(run_dir)})
        logger.info("trial %d %s: %s %s after %d round(s)", number, state,
                    space.metric, f"{final:.4f}", len(by_round))
        (out / "trials.json").write_text(json.dumps(rows, indent=2) + "\n")
    done = [r for r in rows if r["state"] == "complete"]
    if done:
        best = (max if space.direction == "maximize" else min)(
            done, key=lambda r: r[space.metric])
        cfg = config.load(base, _overrides(best["params"]))
        (out / "best.yaml").write_text(
            f"# best of {len(rows)} trials ({space.metric} "
            f"{best[space.metric]:.4f}, trial {best['trial']}): "
            f"{' '.join(_overrides(best['params']))}\n" + config.dump_yaml(cfg))
    return rows


def format_trials(rows: list[dict[str, Any]], metric: str, *,
                  direction: str = "maximize") -> str:
    """The table of trials, best first (failed and pruned ones last)."""
    keys = list(rows[0]["params"]) if rows else []
    head = f"{'trial':>5} {'state':<9} {metric:>14} {'rounds':>6}  " + "  ".join(keys)
    lines = [head]
    sign = -1.0 if direction == "maximize" else 1.0
    order = sorted(rows, key=lambda r: (r["state"] != "complete", sign * (
        r[metric] if r[metric] is not None else -sign * math.inf)))
    for r in order:
        value = "-" if r[metric] is None else f"{r[metric]:.4f}"
        lines.append(f"{r['trial']:>5} {r['state']:<9} {value:>14} {r['rounds']:>6}  "
                     + "  ".join(f"{_cell(r['params'][k]):>{len(k)}}" for k in keys))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
