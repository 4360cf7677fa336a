"""The ``fedtune`` commands that need neither side: ``config`` (validate a config
and its data, print the resolved values) and ``assets`` (fetch the embedded
offline defaults). The dispatcher (:mod:`fedtune.simulations.cli`) wires them."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fedtune.common import assets, cliargs, config
from fedtune.common.errors import FedtuneError


def cmd_config(args: argparse.Namespace) -> int:
    if args.defaults:
        if args.items:
            raise FedtuneError("--defaults takes no config or overrides: it lists the "
                               "values every key a run YAML leaves out takes")
        print("# fedtune's built-in defaults: the value of every key a run YAML "
              "leaves out", file=sys.stderr)
        print(config.dump_yaml(config.from_dict({})), end="")
        return 0
    path, _ = cliargs.split(args.items)
    cfg, _ = cliargs.load(args.items)
    if not args.no_data_check:
        cliargs.check_data(cfg)
    what = ("the embedded default scenario (what `fedtune simulate` runs)"
            if path is None else path)
    print(f"# {what}, resolved: keys it leaves out take fedtune's built-in defaults "
          "(`fedtune config --defaults`)", file=sys.stderr)
    print(config.dump_yaml(cfg), end="")
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    for name in args.names or assets.names():
        print(f"{assets.PREFIX}{name}: {assets.resolve(assets.PREFIX + name)}")
    return 0


def add_config_parser(sub: Any) -> None:
    c = sub.add_parser("config", help="validate a config and its data, and print "
                       "the resolved values")
    c.add_argument("items", nargs="*", help=cliargs.ITEMS_HELP)
    c.add_argument("--no-data-check", action="store_true",
                   help="skip reading data.source and data.test_source")
    c.add_argument("--defaults", action="store_true",
                   help="print the built-in default of every key instead")
    c.set_defaults(func=cmd_config)


def add_assets_parser(sub: Any) -> None:
    a = sub.add_parser("assets", help="fetch the embedded offline model/data defaults")
    a.add_argument("names", nargs="*", help=f"default: all of {assets.names()}")
    a.set_defaults(func=cmd_assets)
