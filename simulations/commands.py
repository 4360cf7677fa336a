"""The simulations' ``fedtune`` commands: ``simulate`` (a local federation: the
main job), ``sweep`` (hyper-parameter search over simulations) and ``plan`` (each
site's DP noise against its signal, before training). The dispatcher
(:mod:`fedtune.simulations.cli`) wires them."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fedtune.common import cliargs, sites
from fedtune.common.errors import FedtuneError


def cmd_simulate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if args.resume:
        from fedtune.server.runtime.resume import resumed_config

        cfg, name = resumed_config(args.resume, items=args.items,
                                   past_stop=args.past_early_stop), ""
    else:
        cfg, name = cliargs.load(args.items)
    cliargs.check_data(cfg)
    from fedtune.server.tools.report import headline, load_run, write_report
    from fedtune.simulations.driver import simulate

    if args.resume:
        run_dir = simulate(cfg, run_dir=Path(args.resume), resume=True,
                           data_checked=True, past_stop=args.past_early_stop,
                           verbose=args.verbose)
    else:
        run_dir = simulate(cfg, name=args.name or name, data_checked=True,
                           run_dir=Path(args.run_dir) if args.run_dir else None,
                           verbose=args.verbose)
    print(f"run directory: {run_dir}")
    page, _ = write_report(run_dir)
    print("\n== summary ==\n" + "\n".join(headline(load_run(run_dir))))
    print(f"wall time: {(time.monotonic() - started) / 60:.1f} min")
    print(f"report: {page} (text: fedtune report {run_dir})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from fedtune.common import plan_text, planning

    cfg, _ = cliargs.load(args.items)
    sizes = ([(f"site {i}", n) for i, n in enumerate(args.records)] if args.records
             else sites.simulated_sites(cfg))
    plans = planning.plan_sites(cfg, sizes, dims=planning.model_dims(cfg))
    print(plan_text.format_plan(plans, cfg, full=args.all))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import yaml

    from fedtune.simulations.sweep import format_trials, load_space, sweep

    path = Path(args.config)
    if not path.is_file():
        raise FedtuneError(f"{path}: config file not found; pass a run YAML with a "
                           "sweep section")
    out = Path(args.out or f"sweeps/{path.stem}")
    rows = sweep(path, trials=args.trials, out=out, seed=args.seed,
                 timeout=args.trial_timeout)
    space = load_space(yaml.safe_load(path.read_text(encoding="utf-8")))
    print(format_trials(rows, space.metric, direction=space.direction))
    best = out / "best.yaml"
    print(f"trials: {out / 'trials.json'}" + (f"\nbest config: {best}"
                                             if best.is_file() else ""))
    return 0 if best.is_file() else 1


def simulate_for_audit(cfg: Any, run_dir: Path) -> Path:
    """``fedtune audit``'s training: a simulation into ``run_dir``."""
    from fedtune.simulations.driver import simulate

    return simulate(cfg, name="audit", run_dir=run_dir)


def add_simulate_parser(sub: Any) -> None:
    s = sub.add_parser("simulate", help="run a local federated simulation")
    s.add_argument("items", nargs="*", help=cliargs.ITEMS_HELP)
    s.add_argument("--name", help="run name (default: the config file's stem)")
    s.add_argument("--run-dir", help="exact run directory to write")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or killed "
                   "run after its last completed round, with its own config")
    s.add_argument("--past-early-stop", action="store_true",
                   help=cliargs.PAST_STOP_HELP)
    s.set_defaults(func=cmd_simulate)


def add_plan_parser(sub: Any) -> None:
    pl = sub.add_parser("plan", help="before training: each site's DP noise against "
                        "its signal, and whether it is expected to learn")
    pl.add_argument("items", nargs="*", help=cliargs.ITEMS_HELP)
    pl.add_argument("--records", type=int, nargs="+", metavar="N",
                    help="training records of each site (a deployment); default: "
                    "the simulation's partition of data.source")
    pl.add_argument("--all", action="store_true",
                    help="one row per site (above 20 sites the plan groups them "
                    "by verdict)")
    pl.set_defaults(func=cmd_plan)


def add_sweep_parser(sub: Any) -> None:
    sw = sub.add_parser("sweep", help="hyper-parameter search over simulations "
                        "(Optuna TPE + pruning; the YAML's sweep section)",
                        description="Each trial is a normal `fedtune simulate` run "
                        "directory. Tuning on private data spends privacy: sweep "
                        "on simulated, public or proxy data.")
    sw.add_argument("config", help="run YAML with a sweep section (metric, "
                    "direction, space)")
    sw.add_argument("--trials", type=int, default=8, help="trials (default 8)")
    sw.add_argument("--out", help="sweep directory (default sweeps/NAME)")
    sw.add_argument("--seed", type=int, default=0, help="TPE seed (default 0)")
    sw.add_argument("--trial-timeout", type=float, default=3600.0,
                    help="seconds before a trial is stopped as failed")
    sw.set_defaults(func=cmd_sweep)
