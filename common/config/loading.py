"""The config's plumbing from YAML: :func:`from_dict` (every problem at once,
renamed keys read for one release with a deprecation warning), the cross-section
checks, ``key=value`` overrides, :func:`load` and :func:`dump_yaml`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fedtune.common import recipes
from fedtune.common.config.federation import _ROBUST
from fedtune.common.config.run import SECTIONS, RunConfig
from fedtune.common.config.training import (
    TrainConfig,
)
from fedtune.common.distributed_noise import power_of_two_problem
from fedtune.common.errors import ConfigError

logger = logging.getLogger(__name__)


RENAMED = {  # (section, old key) -> new key; the old key is read for one release
    ("train", "early_stopping_patience"): "epoch_patience",
    ("federation", "early_stopping_patience"): "round_patience",
}
SWEEP = "sweep"  # the search space of `fedtune sweep`; no part of a run's config


def from_dict(raw: Mapping[str, Any] | None) -> RunConfig:
    """Build a :class:`RunConfig`, reporting every problem at once.

    Raises
    ------
    ConfigError
        Listing each unknown key and each bad value with what it expects.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"top level: expected a mapping of sections, got {raw!r}")
    problems = [f"{k}: unknown section (known: {', '.join(SECTIONS)}, and sweep "
                "for fedtune sweep)" for k in raw if k not in SECTIONS and k != SWEEP]
    built: dict[str, Any] = {}
    used_old: dict[str, str] = {}  # "section.new" -> "section.old" the user wrote
    for name, cls in SECTIONS.items():
        values = raw.get(name)
        values = {} if values is None else values
        if not isinstance(values, Mapping):
            problems.append(f"{name}: expected a mapping of keys, got {values!r}")
            continue
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # (same)
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        _renamed(name, values, used_old)
        if name == "data" and "source" in values and "test_source" not in values:
            # the built-in test set belongs to the built-in data only
            values["test_source"] = ""
        if name == "data" and "source" in values and "labels" not in values and \
                _task(raw) == "classification":
            # the built-in labels belong to the built-in data only: the run's are
            # read from its training file (fedtune.common.data.with_labels)
            values["labels"] = ()
        unknown = sorted(set(values) - known)
        problems += [f"{name}.{k}: unknown key (known: {', '.join(sorted(known))})"
                     for k in unknown]
        try:
            built[name] = cls(**{k: v for k, v in values.items() if k in known})
        except ConfigError as err:
            problems += err.problems
    if not problems:
        built, _ = recipes.resolve(built)
        problems += _cross_checks(built)
    if problems:
        raise ConfigError([_as_written(p, used_old) for p in problems])
    return RunConfig(**built)


def _task(raw: Mapping[str, Any]) -> str:
    """The task a raw config names (the default: classification)."""
    model = raw.get("model")
    return str(model.get("task", "classification")) if isinstance(model, Mapping) \
        else "classification"


def _renamed(section: str, values: dict[str, Any], used_old: dict[str, str]
             ) -> None:
    """Read a renamed key under its new name (in place), with a deprecation
    warning naming the new key. Where both names are set, the old one wins:
    fedtune writes only the new name (a run's config.yaml, ``fedtune config``), so
    an old key is the user's own, written over such a config; the warning names
    the value dropped."""
    for (sec, old), new in RENAMED.items():
        if sec != section or old not in values:
            continue
        logger.warning("%s.%s is deprecated and will be removed in the next "
                       "release: write %s.%s (same meaning)", sec, old, sec, new)
        if new in values and values[new] != values[old]:
            logger.warning("%s.%s=%r and %s.%s=%r are both set: the old key, the "
                           "one a person wrote, is used", sec, old, values[old],
                           sec, new, values[new])
        values[new] = values.pop(old)
        used_old[f"{sec}.{new}"] = f"{sec}.{old}"


def _as_written(problem: str, used_old: Mapping[str, str]) -> str:
    """A problem about a renamed key names the key the user wrote."""
    for new, old in used_old.items():
        if problem.startswith(new + ":"):
            return f"{old}:{problem[len(new) + 1:]} (renamed {new})"
    return problem


def _cross_checks(sec: Mapping[str, Any]) -> list[str]:
    """Settings of different sections that cannot go together."""
    fed, lora, priv = sec["federation"], sec["lora"], sec["privacy"]
    train, model = sec["train"], sec["model"]
    out = []
    if model.task != "classification":
        # a key at its default or switched off is fine (a shared base config); a
        # value that would act on a classification head is refused
        defaults = TrainConfig()
        off = {"linear_probe_rounds": 0, "logit_adjustment": 0.0,
               "calibrate_decisions": False, "class_weighting": "none"}
        # (the head rounds' own learning rate, epochs and optimizer act only in
        # head rounds, which linear_probe_rounds decides: a saved config holding
        # an earlier default of theirs still loads)
        used = [f"train.{k}" for k in ("linear_probe_rounds", "logit_adjustment",
                                        "class_weighting", "calibrate_decisions")
                if getattr(train, k) not in (getattr(defaults, k), off.get(k))]
        used += ["model.head_hidden"] * bool(model.head_hidden)
        out += [f"{k}: needs model.task classification (it acts on the "
                f"classification head), got {model.task!r}" for k in used]
    probe = train.linear_probe_rounds
    probe = fed.num_rounds if probe < 0 else probe
    if priv.linear_probe_budget and not 0 < probe < fed.num_rounds:
        out.append("privacy.linear_probe_budget: needs train.linear_probe_rounds "
                   "between 1 and federation.num_rounds - 1 (a budget split needs "
                   "both phases)")
    if model.task == "classification" and train.calibrate_decisions and \
            train.logit_adjustment > 0 and not sec["data"].val_fraction:
        out.append("train.calibrate_decisions: needs data.val_fraction > 0 (each "
                   "site scores the candidate decisions on its own validation "
                   "split); set data.val_fraction (e.g. 0.1) or "
                   "train.calibrate_decisions: false")
    if priv.linear_probe_budget and priv.noise_multiplier:
        out.append("privacy.linear_probe_budget: cannot be combined with a fixed "
                   "privacy.noise_multiplier (the split calibrates the noise of "
                   "each phase); set one or the other")
    if fed.weighting != "examples" and (fed.strategy in _ROBUST or priv.central_dp
                                        or fed.secure_aggregation):
        out.append(f"federation.weighting: {fed.weighting!r} applies to the FedAvg "
                   f"family only; federation.strategy {fed.strategy!r}, "
                   "privacy.central_dp and federation.secure_aggregation weigh "
                   "sites their own way")
    if priv.central_dp and fed.strategy != "fedavg":
        out.append(f"privacy.central_dp: needs federation.strategy fedavg (central "
                   f"DP clips and averages uniformly), got {fed.strategy!r}")
    if fed.secure_aggregation and lora.mixed_ranks:
        out.append("lora.site_ranks: cannot be combined with federation.secure_"
                   "aggregation (SecAgg+ needs one shape on every site)")
    if train.personalize_epochs and not sec["data"].val_fraction:
        out.append("train.personalize_epochs: needs data.val_fraction > 0 (each site "
                   "scores the global and its personalised adapter on its own "
                   "held-out split)")
    if lora.prompt_method and model.task != "causal-lm":
        out.append(f"lora.method: {lora.method} tuning is offered for causal LMs "
                   "(model.task: causal-lm); a classifier trains lora, ia3, "
                   "layernorm or bitfit")
    if sec["data"].retention_source and model.task != "causal-lm":
        out.append("data.retention_source: needs model.task causal-lm (it scores "
                   "general text by perplexity)")
    metric = fed.selection_metric
    if (metric in ("macro-f1", "accuracy") and model.task != "classification") or (
            metric == "perplexity" and model.task == "classification"):
        out.append(f"federation.selection_metric: {metric!r} is not measured for "
                   f"model.task {model.task!r}; use loss, or "
                   + ("macro-f1 / accuracy" if model.task == "classification"
                      else "perplexity"))
    if fed.round_patience and not sec["data"].test_source:
        out.append("federation.round_patience: needs the central "
                   "evaluation set data.test_source (the rounds are compared on it)")
    out += _distributed_noise(fed, priv, train)
    if fed.secure_aggregation and priv.central_dp:
        out.append("privacy.central_dp: cannot be combined with federation.secure_"
                   "aggregation (central DP clips each site's update, which SecAgg+ "
                   "hides from the server)")
    return out


def _distributed_noise(fed: Any, priv: Any, train: Any) -> list[str]:
    """``privacy.noise: distributed`` and what it needs: SecAgg+, ``t < n``, a
    SecAgg+ threshold that unmasks only sums of at least ``n - t`` shares and
    keeps fewer than it colluding, and one DP step per round."""
    if priv.noise != "distributed":
        return []
    n, t = fed.train_nodes, priv.max_dropped_or_colluding
    if not priv.enabled:
        return ["privacy.noise: distributed needs privacy.enabled (it is DP noise)"]
    if not fed.secure_aggregation:
        return ["privacy.noise: distributed needs federation.secure_aggregation: "
                "true (a site's share alone is not private: only SecAgg+'s sum "
                "carries the whole noise); turn SecAgg+ on or use noise: local"]
    out = []
    if t >= n:
        out.append(f"privacy.max_dropped_or_colluding: {t} must be below the {n} "
                   "sites a round trains (federation.min_train_nodes, or num_sites "
                   "x fraction_train)")
    elif not (fed.secagg_threshold >= n - t and fed.secagg_threshold > t):
        out.append(f"federation.secagg_threshold: {fed.secagg_threshold} does not "
                   f"fit privacy.max_dropped_or_colluding {t} at {n} sites: it must "
                   f"be at least n - t = {n - t} (a sum is unmasked only with the "
                   f"shares of that many sites) and above t (SecAgg+ hides a site "
                   f"from fewer colluders than the threshold)"
                   + ("" if n - t > t else f"; no threshold fits: t must be below "
                      f"n/2 ({(n - 1) // 2} at most)"))
    grid = power_of_two_problem(fed.secagg_clipping_range)
    out += [grid] if grid and fed.secagg_clipping_range > 0 else []
    if priv.noise_multiplier:
        out.append("privacy.noise_multiplier: distributed noise calibrates its own "
                   "(one full-batch step per round); leave it 0")
    if train.personalize_epochs:
        out.append("train.personalize_epochs: not offered with distributed noise "
                   "(a personalisation is a local release)")
    return out


def to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Return the plain nested mapping that :func:`from_dict` accepts."""
    return {
        name: {k: list(v) if isinstance(v, tuple) else v
               for k, v in dataclasses.asdict(getattr(cfg, name)).items()}
        for name in SECTIONS
    }


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ``section.key=value`` strings into a nested mapping (values as YAML)."""
    out: dict[str, dict[str, Any]] = {}
    bad = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            bad.append(f"{pair!r}: expected section.key=value, "
                       "e.g. train.batch-size=32")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            bad.append(f"{pair!r}: value is not valid YAML ({err})")
            continue
        out.setdefault(section, {})[name.replace("-", "_")] = value
    if bad:
        raise ConfigError(bad)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, values in over.items():
        if isinstance(values, Mapping) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def load(path: str | Path | None = None,
         overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (or the defaults) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found; pass an existing YAML file")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        raw = loaded or {}
    return from_dict(_merge(raw, parse_overrides(overrides or [])))


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (written into every run directory)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
