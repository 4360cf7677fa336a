"""A site's own rules for what its data may be used for (``fedtune client --policy``).

A hospital's privacy officer writes them; the operator's run config cannot change
them. The daemon checks the file when it starts (an unknown key or a bad value stops
it, naming the key); every message a deployed site receives is then checked against
them *before any record is read*: a run that breaks a rule is declined, the server
learns the rule's name and the run's offending value (never the site's data, nor
which other models it allows), no training happens and nothing is charged.

Rules (every key optional):

- DP is required, with or without a policy file; only the daemon's
  ``--allow-non-private`` lets a run train without it (and it is loud);
- ``max_epsilon_per_run``: the largest ``privacy.target_epsilon`` a run may ask;
- ``budget_epsilon``: the site's total budget over all runs (its ledger refuses a
  round that would exceed it), as ``--budget-epsilon``;
- ``allowed_models``: base models by ``model.name_or_path`` or by ``sha256:<hex>`` of
  the weights file(s) the site loads (``sha256sum model.safetensors``);
- ``allowed_tasks``: ``classification``, ``causal-lm``;
- ``min_noise_multiplier``: the smallest DP-SGD noise multiplier a round may train
  with (checked once the run's noise is planned, still before any release);
- ``max_clipping_norm``: the largest ``privacy.max_grad_norm``;
- ``personalized_adapters``: whether the site may write personalised adapters
  (default true);
- ``allowed_noise``: ``local`` (the site adds the whole DP-SGD noise itself),
  ``distributed`` (its share of noise pooled under SecAgg+, trusting that at most
  ``privacy.max_dropped_or_colluding`` sites drop out or collude with the server);
  ``[local]`` requires local noise.

In a simulation there is no site daemon and no policy: the researcher owns every
site.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from fedtune.client.mods import SiteFailure
from fedtune.common import assets
from fedtune.common.errors import SITE_POLICY, DeploymentError

logger = logging.getLogger(__name__)

POLICY_PATH = "site-policy"  # node_config: the checked policy file
NON_PRIVATE = "allow-non-private"  # node_config: the daemon's --allow-non-private
TASKS = ("classification", "causal-lm")
NOISE = ("local", "distributed")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class PolicyDeclined(SiteFailure):
    """A run breaks one of the site's rules: the site declines it (the rule and
    the run's value reach the server as they are: they name no data)."""

    def __init__(self, rule: str, why: str) -> None:
        super().__init__(f"{SITE_POLICY} on the site: rule {rule}: {why}")
        self.rule = rule


@dataclass(frozen=True)
class SitePolicy:
    """A site's rules; the defaults are a site without a policy file."""

    max_epsilon_per_run: float = 0.0  # 0: no cap
    budget_epsilon: float = 0.0  # 0: no total limit
    allowed_models: tuple[str, ...] = ()  # empty: any
    allowed_tasks: tuple[str, ...] = ()  # empty: any
    min_noise_multiplier: float = 0.0
    max_clipping_norm: float = 0.0  # 0: no cap
    personalized_adapters: bool = True
    allowed_noise: tuple[str, ...] = ()  # empty: any
    allow_non_private: bool = False  # the daemon's flag, never the file's

    def describe(self) -> str:
        """The rules in one line, for the daemon's log."""
        out = ["DP required" if not self.allow_non_private
               else "DP NOT required (--allow-non-private)"]
        if self.max_epsilon_per_run:
            out.append(f"epsilon <= {self.max_epsilon_per_run:g} per run")
        if self.budget_epsilon:
            out.append(f"total budget epsilon {self.budget_epsilon:g}")
        if self.allowed_models:
            out.append(f"{len(self.allowed_models)} allowed model(s)")
        if self.allowed_tasks:
            out.append("tasks " + ", ".join(self.allowed_tasks))
        if self.min_noise_multiplier:
            out.append(f"noise multiplier >= {self.min_noise_multiplier:g}")
        if self.max_clipping_norm:
            out.append(f"clipping bound <= {self.max_clipping_norm:g}")
        if not self.personalized_adapters:
            out.append("no personalised adapters")
        if self.allowed_noise:
            out.append("noise " + ", ".join(self.allowed_noise))
        return "; ".join(out)


_FILE_KEYS = tuple(f.name for f in fields(SitePolicy) if f.name != "allow_non_private")


def _number(path: Path, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or value < 0:
        raise DeploymentError(f"{path}: {key}: expected a number >= 0, got {value!r}")
    return float(value)


def _strings(path: Path, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip()
                                              for v in value):
        raise DeploymentError(f"{path}: {key}: expected a list of names, got "
                              f"{value!r}")
    return tuple(v.strip() for v in value)


def parse(raw: Any, path: Path) -> SitePolicy:
    """The policy a YAML mapping states; every unknown key and bad value named."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DeploymentError(f"{path}: a site policy is a mapping of rules "
                              f"({', '.join(_FILE_KEYS)})")
    unknown = sorted(set(raw) - set(_FILE_KEYS))
    if unknown:
        hint = (" (DP can be turned off only with the daemon's --allow-non-private)"
                if any("dp" in k.lower() or "private" in k.lower() for k in unknown)
                else "")
        raise DeploymentError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}"
                              f"; a site policy knows {', '.join(_FILE_KEYS)}{hint}")
    values: dict[str, Any] = {}
    for key in ("max_epsilon_per_run", "budget_epsilon", "min_noise_multiplier",
                "max_clipping_norm"):
        if key in raw:
            values[key] = _number(path, key, raw[key])
    for key in ("allowed_models", "allowed_tasks", "allowed_noise"):
        if key in raw:
            values[key] = _strings(path, key, raw[key])
    for key, known, what in (("allowed_tasks", TASKS, "task(s)"),
                             ("allowed_noise", NOISE, "noise")):
        bad = [t for t in values.get(key, ()) if t not in known]
        if bad:
            raise DeploymentError(f"{path}: {key}: unknown {what} {bad}; use "
                                  f"{', '.join(known)}")
    for digest in values.get("allowed_models", ()):
        if digest.startswith("sha256:") and len(_hex(digest)) != 64:
            raise DeploymentError(f"{path}: allowed_models: {digest!r} is not a "
                                  "sha256 (64 hex digits after 'sha256:')")
    if "personalized_adapters" in raw:
        if not isinstance(raw["personalized_adapters"], bool):
            raise DeploymentError(f"{path}: personalized_adapters: expected true or "
                                  f"false, got {raw['personalized_adapters']!r}")
        values["personalized_adapters"] = raw["personalized_adapters"]
    return SitePolicy(**values)


def _hex(digest: str) -> str:
    text = digest.removeprefix("sha256:").lower()
    return text if all(c in "0123456789abcdef" for c in text) else ""


def load(path: Path, *, allow_non_private: bool = False) -> SitePolicy:
    """The site's policy file, checked (the daemon's start and every message)."""
    path = path.expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeploymentError(f"--policy {path}: no such file") from None
    except OSError as err:
        raise DeploymentError(f"--policy {path}: cannot be read ({err.strerror})"
                              ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise DeploymentError(f"--policy {path}: not valid YAML: "
                              f"{' '.join(str(err).split())[:200]}") from None
    policy = parse(raw, path)
    return SitePolicy(**{**{f.name: getattr(policy, f.name) for f in fields(policy)},
                         "allow_non_private": allow_non_private})


@functools.lru_cache(maxsize=8)
def _cached(path: str, stamp: tuple[int, int], allow_non_private: bool
            ) -> SitePolicy:
    return load(Path(path), allow_non_private=allow_non_private)


def of_node(node_config: Mapping[str, Any]) -> SitePolicy | None:
    """A deployed site's policy (its node_config names the file the daemon checked;
    without one, the defaults: DP required); None for a simulated site."""
    if "data-path" not in node_config:
        return None
    allow = str(node_config.get(NON_PRIVATE, "")).lower() in ("1", "true", "yes")
    path = node_config.get(POLICY_PATH)
    if not path:
        return SitePolicy(allow_non_private=allow)
    try:
        info = Path(str(path)).stat()
    except OSError:
        raise PolicyDeclined("policy-file", "the site's policy file is gone; the "
                             "site declines every run until it is back") from None
    return _cached(str(path), (info.st_size, info.st_mtime_ns), allow)


@functools.lru_cache(maxsize=8)
def _digests(files: tuple[tuple[str, int, int], ...], root: str) -> frozenset[str]:
    """Once per version of the files (``files``: name, size, mtime)."""
    return frozenset(assets.file_sha256(Path(root) / name) for name, _, _ in files)


def weight_digests(name_or_path: str) -> frozenset[str]:
    """sha256 of each weights file of a local model (what ``sha256sum`` prints);
    empty where the model is not a local directory or file."""
    path = Path(assets.resolve(name_or_path))
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    else:
        return frozenset()
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _digests(stamp, str(path.parent if path.is_file() else path))


def check_model(policy: SitePolicy, name_or_path: str) -> None:
    """The run's base model is one the site allows, by name or by its weights."""
    allowed = policy.allowed_models
    if not allowed or name_or_path in allowed:
        return
    wanted = {_hex(a) for a in allowed if a.startswith("sha256:")}
    if wanted:
        have = weight_digests(name_or_path)
        if have and have <= wanted:
            return
    raise PolicyDeclined("allowed_models", f"the run's model {name_or_path!r} is "
                         "not one this site allows (by name or by the sha256 of "
                         "its weights)")


def enforce(policy: SitePolicy | None, cfg: Any, *, personalize: bool = False
            ) -> None:
    """Decline a run that breaks a rule (before any record is read); ``cfg``: the
    run's :class:`~fedtune.common.config.RunConfig`."""
    if policy is None:
        return
    p = cfg.privacy
    if not p.enabled and not policy.allow_non_private:
        raise PolicyDeclined("dp-required", "the run turns DP off "
                             "(privacy.enabled=false); this site trains only "
                             "under DP")
    if p.enabled and policy.max_epsilon_per_run and \
            p.target_epsilon > policy.max_epsilon_per_run:
        raise PolicyDeclined("max_epsilon_per_run", f"the run asks epsilon "
                             f"{p.target_epsilon:g}, above the site's "
                             f"{policy.max_epsilon_per_run:g}")
    if p.enabled and policy.max_clipping_norm and \
            p.max_grad_norm > policy.max_clipping_norm:
        raise PolicyDeclined("max_clipping_norm", f"the run clips at "
                             f"{p.max_grad_norm:g}, above the site's "
                             f"{policy.max_clipping_norm:g}")
    if p.enabled and policy.min_noise_multiplier and 0 < p.noise_multiplier < \
            policy.min_noise_multiplier:
        raise PolicyDeclined("min_noise_multiplier", f"the run sets noise "
                             f"multiplier {p.noise_multiplier:g}, below the site's "
                             f"{policy.min_noise_multiplier:g}")
    if p.enabled and policy.allowed_noise and p.noise not in policy.allowed_noise:
        raise PolicyDeclined("allowed_noise", f"the run asks {p.noise} noise "
                             f"(privacy.noise); this site allows "
                             f"{', '.join(policy.allowed_noise)} only")
    if policy.allowed_tasks and cfg.model.task not in policy.allowed_tasks:
        raise PolicyDeclined("allowed_tasks", f"the run's task {cfg.model.task!r} "
                             "is not one this site allows")
    if personalize and not policy.personalized_adapters:
        raise PolicyDeclined("personalized_adapters", "the run asks for a "
                             "personalised adapter; this site writes none")
    check_model(policy, cfg.model.name_or_path)


def check_noise(policy: SitePolicy | None, sigmas: list[float]) -> None:
    """The run's planned DP-SGD noise multipliers (every phase) against the
    site's minimum: called once the noise is planned, before any release."""
    if policy is None or not policy.min_noise_multiplier:
        return
    low = [s for s in sigmas if 0 < s < policy.min_noise_multiplier]
    if low:
        raise PolicyDeclined("min_noise_multiplier", f"the run's planned noise "
                             f"multiplier {min(low):.3g} is below the site's "
                             f"{policy.min_noise_multiplier:g} (a larger "
                             "privacy budget per run buys less noise)")
