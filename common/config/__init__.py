"""Run configuration: YAML <-> frozen dataclasses <-> Flower's flat run_config.

The dataclasses (:mod:`.sections`, :mod:`.training`, :mod:`.federation`,
:mod:`.run`, on :mod:`.base`) apart from their plumbing (:mod:`.loading`: YAML,
overrides, renamed keys; :mod:`.flat`: the flat run_config and the launch keys).
Every public name is re-exported here: ``from fedtune.common.config import
RunConfig`` is the way in.

One YAML file describes a run. Each section is a frozen dataclass whose
``__post_init__`` validates every field; :func:`from_dict` collects the problems of
all sections (unknown keys, wrong types, bad values) and raises them together in one
:class:`ConfigError`. Flower carries the run config as a flat mapping of scalars, so
:func:`to_run_config` flattens a :class:`RunConfig` into dotted kebab-case keys
(``train.learning-rate``) with lists JSON-encoded, and :func:`from_run_config`
reverses it exactly.
"""

from __future__ import annotations

from fedtune.common.config.base import Scalar
from fedtune.common.config.federation import FederationConfig
from fedtune.common.config.flat import (
    PAST_STOP,
    RESUME,
    RUN_PATH,
    SIMULATED,
    SITE_LABELS,
    from_run_config,
    run_config_key,
    site_labels,
    site_labels_value,
    to_run_config,
)
from fedtune.common.config.loading import (
    RENAMED,
    SWEEP,
    dump_yaml,
    from_dict,
    load,
    parse_overrides,
    to_dict,
)
from fedtune.common.config.run import SECTIONS, RunConfig
from fedtune.common.config.sections import (
    CALIBRATION_NOISE_AT_8,
    LoraConfig,
    ModelConfig,
    PrivacyConfig,
)
from fedtune.common.config.training import (
    AUTO_LENGTH_CAP,
    AUTO_LENGTH_PERCENTILE,
    ICD10_CHAPTERS,
    DataConfig,
    Strategy,
    TrainConfig,
    describe_problems,
)
from fedtune.common.errors import ConfigError

__all__ = [
    "AUTO_LENGTH_CAP",
    "AUTO_LENGTH_PERCENTILE",
    "CALIBRATION_NOISE_AT_8",
    "ConfigError",
    "DataConfig",
    "FederationConfig",
    "ICD10_CHAPTERS",
    "LoraConfig",
    "ModelConfig",
    "PAST_STOP",
    "PrivacyConfig",
    "RENAMED",
    "RESUME",
    "RUN_PATH",
    "RunConfig",
    "SECTIONS",
    "SIMULATED",
    "SITE_LABELS",
    "SWEEP",
    "Scalar",
    "Strategy",
    "TrainConfig",
    "describe_problems",
    "dump_yaml",
    "from_dict",
    "from_run_config",
    "load",
    "parse_overrides",
    "run_config_key",
    "to_dict",
    "site_labels",
    "site_labels_value",
    "to_run_config",
]
