"""What every side's commands share: a config reference (a YAML file or a shipped
scenario by name) followed by ``key=value`` overrides, and the help words for them.

The shipped scenarios are YAML files installed as package data of
``fedtune.simulations``; they are read here as data (no simulation code is
imported), so that ``fedtune run iid-dp`` on a deployment and ``fedtune simulate
iid-dp`` name the same file.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from fedtune.common import config

logger = logging.getLogger("fedtune")
ITEMS_HELP = ("[CONFIG.yaml] [section.key=value ...]; default config: the embedded "
              "simulations/default.yaml")
PAST_STOP_HELP = ("with --resume: continue a run that stopped early (federation."
                  "round_patience) up to its num_rounds")


def default_scenario() -> Path:
    """The embedded default run (``simulations/default.yaml``)."""
    return Path(str(resources.files("fedtune.simulations") / "default.yaml"))


def scenarios() -> dict[str, Path]:
    """The shipped scenarios by name (``default``, ``iid-nodp``, ...)."""
    root = resources.files("fedtune.simulations")
    return {Path(e.name).stem: Path(str(e)) for e in root.iterdir()
            if e.name.endswith(".yaml")}


def scenario(ref: str) -> str:
    """A config reference: an existing file, or the name of a shipped scenario."""
    if Path(ref).is_file():
        return ref
    shipped = scenarios()
    name = Path(ref).stem if Path(ref).suffix in (".yaml", ".yml") else ref
    if name in shipped and (Path(ref).parent == Path(".") or
                            Path(ref).parent.name == "simulations"):
        return str(shipped[name])
    if "/" not in ref and "." in ref and Path(ref).suffix not in (".yaml", ".yml"):
        raise config.ConfigError(
            f"{ref}: neither a config file nor a key=value override; to set a key "
            f"write KEY=VALUE, e.g. {ref}=..., and `fedtune config` prints the "
            "resolved values")
    raise config.ConfigError(
        f"{ref}: config file not found; pass an existing YAML file or a shipped "
        f"scenario by name ({', '.join(sorted(shipped))})")


def split(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [key=value ...]`` -> (config path or None, overrides)."""
    if items and "=" not in items[0]:
        return scenario(items[0]), items[1:]
    return None, items


def load(items: list[str]) -> tuple[config.RunConfig, str]:
    """The run config ``items`` name (the default scenario when they name no
    file), and its name (the file's stem)."""
    from fedtune.common.data import with_labels

    path, overrides = split(items)
    path = path or str(default_scenario())
    return with_labels(config.load(path, overrides)), Path(path).stem


def check_data(cfg: config.RunConfig) -> None:
    """Warn about what the simulation's data files will do to the run."""
    from fedtune.common import sites  # before the engine's imports: seconds

    for warning in sites.check_simulation_data(cfg):
        logger.warning("%s", warning)
