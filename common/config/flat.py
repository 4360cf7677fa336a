"""Flower's flat run_config: :func:`to_run_config` flattens a :class:`RunConfig`
into dotted kebab-case keys (``train.learning-rate``) with lists JSON-encoded, and
:func:`from_run_config` reverses it exactly; the launch keys the CLI adds.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from typing import Any

from fedtune.common.config.base import (
    Scalar,
)
from fedtune.common.config.loading import (
    from_dict,
    to_dict,
)
from fedtune.common.config.run import SECTIONS, RunConfig
from fedtune.common.errors import ConfigError

RUN_PATH = "fedtune.run-path"  # run_config key: exact run directory (set by the CLI)
RESUME = "fedtune.resume"  # run_config key: continue RUN_PATH from its saved state
PAST_STOP = "fedtune.past-early-stop"  # run_config key: resume a run that stopped early
SIMULATED = "fedtune.simulated"  # run_config key: sites are data.source partitions
SITE_LABELS = "fedtune.site-labels"  # run_config key: "NODE=LABEL,..." (registration)


def site_labels(value: object) -> dict[str, str]:
    """The operator's site labels by node id, from the run_config's
    :data:`SITE_LABELS` (empty when the run carries none)."""
    out: dict[str, str] = {}
    for pair in str(value or "").split(","):
        node, sep, label = pair.partition("=")
        if sep and node.strip() and label.strip():
            out[node.strip()] = label.strip()
    return out


def site_labels_value(labels: dict[str, str]) -> str:
    """:data:`SITE_LABELS`' value for ``labels`` (node id -> label)."""
    return ",".join(f"{node}={label}" for node, label in sorted(labels.items()))


def run_config_key(section: str, field: str) -> str:
    """The flat run_config key of ``section.field`` (``federation.round-timeout``)."""
    return f"{section}.{field.replace('_', '-')}"


def to_run_config(cfg: RunConfig) -> dict[str, Scalar]:
    """Flatten to Flower's run_config: ``section.kebab-key`` -> scalar."""
    flat: dict[str, Scalar] = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            name = run_config_key(section, key)
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def from_run_config(flat: Mapping[str, Any]) -> RunConfig:
    """Inverse of :func:`to_run_config`; keys outside the sections are ignored
    (Flower adds its own)."""
    raw: dict[str, dict[str, Any]] = {}
    list_fields = {
        (s, f.name)
        for s, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]  # cls is a dataclass
        if typing.get_origin(typing.get_type_hints(cls)[f.name]) is tuple
    }
    for key, value in flat.items():
        section, dot, name = str(key).partition(".")
        if not dot or section not in SECTIONS:
            continue
        name = name.replace("-", "_")
        if (section, name) in list_fields and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"{key}: expected a JSON list, got {value!r}") from err
        raw.setdefault(section, {})[name] = value
    return from_dict(raw)
