"""The ``fedtune`` command. Dispatch only: each subcommand imports its side lazily."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

from fedtune.common import assets, config
from fedtune.common.errors import FedtuneError

logger = logging.getLogger("fedtune")


def default_scenario() -> Path:
    """The embedded default run (``simulations/default.yaml``)."""
    return Path(str(resources.files("fedtune.simulations") / "default.yaml"))


def _split(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [key=value ...]`` -> (config path or None, overrides)."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _load(items: list[str]) -> tuple[config.RunConfig, str]:
    path, overrides = _split(items)
    path = path or str(default_scenario())
    return config.load(path, overrides), Path(path).stem


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedtune.server.simulation import simulate

    cfg, name = _load(args.items)
    run_dir = simulate(cfg, name=args.name or name,
                       run_dir=Path(args.run_dir) if args.run_dir else None)
    print(f"run directory: {run_dir}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg, _ = _load(args.items)
    print(config.dump_yaml(cfg), end="")
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    for name in args.names or assets.names():
        print(f"{assets.PREFIX}{name}: {assets.resolve(assets.PREFIX + name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedtune", description="Privacy-preserving federated fine-tuning: LoRA "
        "adapters trained with DP-SGD on each site, aggregated with Flower.")
    sub = p.add_subparsers(dest="command", required=True)
    items_help = ("[CONFIG.yaml] [section.key=value ...]; default config: the embedded "
                  "simulations/default.yaml")
    s = sub.add_parser("simulate", help="run a local federated simulation")
    s.add_argument("items", nargs="*", help=items_help)
    s.add_argument("--name", help="run name (default: the config file's stem)")
    s.add_argument("--run-dir", help="exact run directory to write")
    s.set_defaults(func=cmd_simulate)
    c = sub.add_parser("config", help="validate and print the resolved config")
    c.add_argument("items", nargs="*", help=items_help)
    c.set_defaults(func=cmd_config)
    a = sub.add_parser("assets", help="fetch the embedded offline model/data defaults")
    a.add_argument("names", nargs="*", help=f"default: all of {assets.names()}")
    a.set_defaults(func=cmd_assets)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower logs through its own handler
    try:
        return int(args.func(args))
    except FedtuneError as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
