"""The ``fedtune`` command: the thin top-level dispatcher. It only wires each
side's commands into one parser (their flags and work live with the side that
owns them) and runs the chosen one:

- :mod:`fedtune.simulations.commands`: ``simulate``, ``sweep``, ``plan``;
- :mod:`fedtune.common.commands`: ``config``, ``assets``;
- :mod:`fedtune.server.operations.commands`: ``server``, ``run``, ``status``,
  ``deployment``, ``keys``;
- :mod:`fedtune.server.tools.commands`: ``report``, ``export``, ``predict``,
  ``evaluate``, ``compare``, ``audit``;
- :mod:`fedtune.client.commands`: ``client``, ``privacy``.

Every command imports its side lazily, so ``fedtune --help`` loads no torch.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fedtune.client import commands as client_commands
from fedtune.common import commands as common_commands
from fedtune.common.deployment import LOG_FORMAT, ensure_app_logging
from fedtune.common.errors import FedtuneError
from fedtune.server.operations import commands as operations_commands
from fedtune.server.tools import commands as tools_commands
from fedtune.simulations import commands as simulation_commands


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedtune", description="Privacy-preserving federated fine-tuning: LoRA "
        "adapters trained with DP-SGD on each site, aggregated with Flower.")
    p.add_argument("--version", action="version",
                   version=f"fedtune {_version()} (flwr {_version('flwr')}, torch "
                   f"{_version('torch')}, opacus {_version('opacus')})")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show other libraries' INFO logs (e.g. alembic's); "
                   "simulate: also the sites' output, Flower's INFO and each "
                   "round's per-site lines (always in RUN_DIR/logs/)")
    sub = p.add_subparsers(dest="command", required=True)
    simulation_commands.add_simulate_parser(sub)
    tools_commands.add_report_parser(sub)
    common_commands.add_config_parser(sub)
    simulation_commands.add_plan_parser(sub)
    simulation_commands.add_sweep_parser(sub)
    common_commands.add_assets_parser(sub)
    operations_commands.add_parsers(sub)
    client_commands.add_client_parser(sub)
    client_commands.add_privacy_parser(sub)
    tools_commands.add_parsers(sub, train=simulation_commands.simulate_for_audit)
    return p


def _version(dist: str = "fedtune") -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


class _Quiet(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated: its successor
    (``flwr run`` on a packaged app with a simulation federation) cannot take the
    in-memory apps and mods a fedtune simulation passes; the call is pinned with
    Flower's version range in pyproject.toml."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("DEPRECATED FEATURE" in text and "run_simulation" in text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Libraries' INFO through the root logger (alembic's, at each start) is noise to
    # a user; fedtune's own INFO, Flower's round lines and all warnings stay. -v
    # shows it all.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        stream=sys.stderr,
                        format=LOG_FORMAT)
    ensure_app_logging()
    flwr = logging.getLogger("flwr")
    flwr.propagate = False  # Flower logs through its own handler
    flwr.addFilter(_Quiet())
    try:
        return int(args.func(args))
    except FedtuneError as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
