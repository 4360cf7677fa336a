"""The ``fedtune`` command. Dispatch only: each subcommand imports its side lazily."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from importlib import resources
from pathlib import Path

from fedtune.common import assets, config
from fedtune.common.deployment import LOG_FORMAT, ensure_app_logging
from fedtune.common.errors import FedtuneError
from fedtune.server import rundir
from fedtune.simulations import cli_model

logger = logging.getLogger("fedtune")
PAST_STOP_HELP = ("with --resume: continue a run that stopped early (federation."
                  "early_stopping_patience) up to its num_rounds")


def default_scenario() -> Path:
    """The embedded default run (``simulations/default.yaml``)."""
    return Path(str(resources.files("fedtune.simulations") / "default.yaml"))


def scenarios() -> dict[str, Path]:
    """The shipped scenarios by name (``default``, ``iid-nodp``, ...)."""
    root = resources.files("fedtune.simulations")
    return {Path(e.name).stem: Path(str(e)) for e in root.iterdir()
            if e.name.endswith(".yaml")}


def _scenario(ref: str) -> str:
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


def _split(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [key=value ...]`` -> (config path or None, overrides)."""
    if items and "=" not in items[0]:
        return _scenario(items[0]), items[1:]
    return None, items


def _load(items: list[str]) -> tuple[config.RunConfig, str]:
    path, overrides = _split(items)
    path = path or str(default_scenario())
    return config.load(path, overrides), Path(path).stem


def _resumed(args: argparse.Namespace) -> config.RunConfig:
    """The config a run directory was started with (``--resume``); a run that
    stopped early is refused here, before any engine starts, unless
    ``--past-early-stop``."""
    if args.items:
        raise FedtuneError(f"--resume takes no config or overrides ("
                           f"{' '.join(args.items)}): a run continues with the "
                           "config it started with")
    path = Path(args.resume) / rundir.CONFIG
    if not path.is_file():
        raise FedtuneError(f"{path}: not found; --resume needs a fedtune run "
                           "directory (it holds config.yaml and state.npz)")
    cfg = config.load(path)
    from fedtune.server.runtime.checkpoint import read_metrics
    from fedtune.server.runtime.selection import Selection

    Selection.for_run(cfg).replay(read_metrics(args.resume),
                                  past_stop=args.past_early_stop)
    return cfg


def _check_data(cfg: config.RunConfig) -> None:
    from fedtune.common import data  # before the engine's imports: seconds

    for warning in data.check_simulation_data(cfg):
        logger.warning("%s", warning)


def cmd_simulate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    cfg, name = (_resumed(args), "") if args.resume else _load(args.items)
    _check_data(cfg)
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


def cmd_report(args: argparse.Namespace) -> int:
    from fedtune.server.tools.report import write_report

    page, text = write_report(args.run_dir, args.out)
    print(text)
    print(f"report: {page}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.defaults:
        if args.items:
            raise FedtuneError("--defaults takes no config or overrides: it lists the "
                               "values every key a run YAML leaves out takes")
        print("# fedtune's built-in defaults: the value of every key a run YAML "
              "leaves out", file=sys.stderr)
        print(config.dump_yaml(config.from_dict({})), end="")
        return 0
    path, _ = _split(args.items)
    cfg, _ = _load(args.items)
    if not args.no_data_check:
        _check_data(cfg)
    what = ("the embedded default scenario (what `fedtune simulate` runs)"
            if path is None else path)
    print(f"# {what}, resolved: keys it leaves out take fedtune's built-in defaults "
          "(`fedtune config --defaults`)", file=sys.stderr)
    print(config.dump_yaml(cfg), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from fedtune.common import planning

    cfg, _ = _load(args.items)
    sites = ([(f"site {i}", n) for i, n in enumerate(args.records)] if args.records
             else planning.simulated_sites(cfg))
    plans = planning.plan_sites(cfg, sites, dims=planning.model_dims(cfg))
    print(planning.format_plan(plans, cfg, full=args.all))
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


def cmd_assets(args: argparse.Namespace) -> int:
    for name in args.names or assets.names():
        print(f"{assets.PREFIX}{name}: {assets.resolve(assets.PREFIX + name)}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from fedtune.server.operations.daemon import ServerOptions, run_server

    run_server(ServerOptions(
        certs=Path(args.certs) if args.certs else None,
        fleet_address=args.fleet_address, control_address=args.control_address,
        state_dir=Path(args.state_dir), insecure=args.insecure,
        log_file=Path(args.log_file) if args.log_file else None))
    return 0  # not reached: the process became the SuperLink


def cmd_client(args: argparse.Namespace) -> int:
    from fedtune.client.node.daemon import ClientOptions, run_client

    return run_client(ClientOptions(
        superlink=args.superlink, data_path=Path(args.data),
        ledger_dir=Path(args.ledger_dir),
        ca_cert=Path(args.ca_cert) if args.ca_cert else None,
        node_key=Path(args.key) if args.key else None, device=args.device,
        state_dir=Path(args.state_dir), clientappio_address=args.clientappio_address,
        insecure=args.insecure, budget_epsilon=args.budget_epsilon,
        budget_delta=args.budget_delta, lora_rank=args.lora_rank,
        worker=not args.no_worker,
        policy=Path(args.policy) if args.policy else None,
        allow_non_private=args.allow_non_private))


def cmd_run(args: argparse.Namespace) -> int:
    from fedtune.server.operations import control

    if args.resume:
        cfg = _resumed(args)
        run_path: Path | None = Path(args.resume).resolve()
    else:
        cfg, _ = _load(args.items)
        run_path = Path(args.run_dir).resolve() if args.run_dir else None
    run_id = control.submit(cfg, name=args.deployment, run_path=run_path,
                            resume=bool(args.resume),
                            past_stop=bool(args.resume) and args.past_early_stop)
    print(f"run {run_id} started on deployment {args.deployment}", flush=True)
    if args.detach:
        return 0
    final = control.stream(run_id, name=args.deployment)
    print(f"run {run_id}: {final}")
    return 0 if final == "finished:completed" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from fedtune.server.operations import control

    print(control.status_text(args.deployment))
    return 0


def cmd_deployment(args: argparse.Namespace) -> int:
    from fedtune.server.operations import control

    if args.action == "add":
        control.add_deployment(args.name, control=args.control,
                                ca_cert=Path(args.ca_cert) if args.ca_cert else None,
                                insecure=args.insecure)
    for name, entry in control.deployments().items():
        tls = "INSECURE" if entry.get("insecure") else entry.get("root-certificates")
        print(f"{name}: {entry.get('address')} {tls}")
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
    from fedtune.client.ledger import summarize

    rows = summarize(Path(args.ledger_dir))
    if not rows:
        print(f"no ledger in {args.ledger_dir}")
    for r in rows:
        budget = "no limit" if r["budget"] is None else f"{r['budget']:g}"
        left = "-" if r["remaining"] is None else f"{r['remaining']:.3f}"
        print(f"dataset {r['dataset'][:12]}  {r['records']} records  {r['runs']} runs  "
              f"{r['rounds']} rounds  epsilon {r['epsilon']:.3f} (delta "
              f"{r['delta']:g})  budget {budget}  remaining {left}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from fedtune.server.tools.audit import run_audit
    from fedtune.simulations.driver import simulate

    cfg, name = _load(args.items)
    out = Path(args.out or f"audits/{name}-{'dp' if cfg.privacy.enabled else 'nodp'}")
    r = run_audit(cfg, out_dir=out, canaries=args.canaries,
                  train=lambda c, d: simulate(c, name="audit", run_dir=d))
    eps = r["accountant_epsilon"]
    print(f"membership inference on the final adapter ({out / 'audit.json'}):")
    print(f"  accountant epsilon     {'inf (DP off)' if eps is None else f'{eps:.3f}'}"
          f" at delta {r['delta']:g}")
    print(f"  canaries   AUC {r['auc_canaries']:.3f}  empirical epsilon >= "
          f"{r['empirical_epsilon_canaries']:.3f}  ({r['canaries_in']} in / "
          f"{r['canaries_out']} out)")
    print(f"  records    AUC {r['auc_records']:.3f}  empirical epsilon >= "
          f"{r['empirical_epsilon_records']:.3f}  ({r['members']} members / "
          f"{r['nonmembers']} held out)")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from fedtune.common import keys

    out = Path(args.out) if getattr(args, "out", None) else None
    if args.action == "ca":
        print(keys.create_ca(out or Path("certs")))
    elif args.action == "server":
        print(keys.create_server_cert(Path(args.ca), out or Path(args.ca),
                                      names=args.san))
    elif args.action == "node":
        for path in keys.create_node_key(out or Path("keys"), args.name):
            print(path)
    elif args.action == "register":
        from fedtune.server.operations import control

        node_id = control.register_node(Path(args.public_key), name=args.deployment,
                                         label=args.label)
        print(f"registered node {node_id}")
    else:
        from fedtune.server.operations import control

        control.unregister_node(args.node_id, name=args.deployment)
        print(f"unregistered node {args.node_id}")
    return 0


def _deploy_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("server", help="start the SuperLink (TLS + node auth on)")
    s.add_argument("--certs", help="directory with ca.crt, server.crt, server.key")
    s.add_argument("--fleet-address", default="0.0.0.0:9092",
                   help="Fleet API, the one port hospitals reach (default %(default)s)")
    s.add_argument("--control-address", default="127.0.0.1:9093",
                   help="Control/Runtime API, loopback or private only "
                   "(default %(default)s)")
    s.add_argument("--state-dir", default="fedtune-server",
                   help="database, run directories, Flower state (default %(default)s)")
    s.add_argument("--log-file", help="also write the SuperLink log here (rotated)")
    s.add_argument("--insecure", action="store_true",
                   help="no TLS, no node authentication: trusted test networks only")
    s.set_defaults(func=cmd_server)
    c = sub.add_parser("client", help="start this hospital's daemon (a SuperNode)")
    c.add_argument("--superlink", required=True,
                   help="the server's Fleet API HOST:PORT")
    c.add_argument("--data", required=True, help="this site's private data file")
    c.add_argument("--ledger-dir", required=True, help="privacy-ledger directory")
    c.add_argument("--ca-cert", help="the federation's CA certificate (ca.crt)")
    c.add_argument("--key", help="this node's private key (NAME.key, mode 0600)")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    c.add_argument("--budget-epsilon", type=float, default=0.0,
                   help="this site's total epsilon per dataset, over all runs "
                   "(0: record, do not limit)")
    c.add_argument("--policy", help="this site's rules (YAML; deploy/README.md): the "
                   "largest epsilon per run, the total budget, the allowed models and "
                   "tasks, the least noise, the largest clipping bound, "
                   "personalised adapters; DP is required with or without it")
    c.add_argument("--allow-non-private", action="store_true",
                   help="let runs train WITHOUT differential privacy on this site "
                   "(the only way to; loud)")
    c.add_argument("--budget-delta", type=float, default=1e-5,
                   help="delta of the budget (default %(default)s)")
    c.add_argument("--lora-rank", type=int, default=0,
                   help="train a smaller LoRA rank than the run's lora.r (a site "
                   "with less compute; heterogeneous-rank aggregation)")
    c.add_argument("--state-dir", default="fedtune-node",
                   help="Flower's app cache and the site worker's socket "
                   "(default %(default)s)")
    c.add_argument("--no-worker", action="store_true",
                   help="load torch, the model and the data again for every message "
                   "in Flower's per-message process instead of a warm site worker "
                   "(slower; for comparison, or a site that cannot keep the model "
                   "in memory)")
    c.add_argument("--clientappio-address", default="127.0.0.1:9094",
                   help="local port for this node's ClientApps (default %(default)s)")
    c.add_argument("--insecure", action="store_true",
                   help="no TLS, no node key: trusted test networks only")
    c.set_defaults(func=cmd_client)
    r = sub.add_parser("run", help="launch a run on a deployment and follow it")
    r.add_argument("items", nargs="*", help="[CONFIG.yaml] [section.key=value ...]")
    r.add_argument("--deployment", required=True, help="name from `fedtune deployment`")
    r.add_argument("--run-dir", help="exact run directory on the server host "
                   "(default: a new one under the server's state dir)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a run directory "
                   "after its last completed round (run on the server host: the "
                   "directory and its state live there)")
    r.add_argument("--past-early-stop", action="store_true",
                   help=PAST_STOP_HELP)
    r.add_argument("--detach", action="store_true", help="start and return")
    r.set_defaults(func=cmd_run)
    st = sub.add_parser("status", help="nodes and runs of a deployment")
    st.add_argument("--deployment", required=True)
    st.set_defaults(func=cmd_status)
    d = sub.add_parser("deployment", help="name a SuperLink's Control API")
    dsub = d.add_subparsers(dest="action", required=True)
    da = dsub.add_parser("add", help="add or replace a named deployment")
    da.add_argument("name")
    da.add_argument("--control", required=True, help="Control API HOST:PORT")
    da.add_argument("--ca-cert", help="the federation's CA certificate")
    da.add_argument("--insecure", action="store_true")
    dsub.add_parser("list", help="list named deployments")
    d.set_defaults(func=cmd_deployment)
    au = sub.add_parser("audit", help="train a federation with planted canaries, then "
                        "attack it (membership inference): the privacy the "
                        "accountant promises, checked empirically")
    au.add_argument("items", nargs="*", help="[CONFIG.yaml] [section.key=value ...]")
    au.add_argument("--canaries", type=int, default=100,
                    help="canaries planted (and as many held out)")
    au.add_argument("--out", help="output directory (default audits/NAME-dp|nodp)")
    au.set_defaults(func=cmd_audit)
    pv = sub.add_parser("privacy", help="a site's privacy ledger")
    pvsub = pv.add_subparsers(dest="action", required=True)
    ps = pvsub.add_parser("show", help="runs, rounds, epsilon spent and remaining")
    ps.add_argument("--ledger-dir", required=True)
    pv.set_defaults(func=cmd_privacy)
    k = sub.add_parser("keys", help="CA, server certificate, node keys, registration")
    ksub = k.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("ca", help="create ca.crt + ca.key (0600)")
    kc.add_argument("--out", help="directory (default certs)")
    ks = ksub.add_parser("server", help="sign server.crt + server.key for --san names")
    ks.add_argument("--ca", required=True, help="directory holding ca.crt and ca.key")
    ks.add_argument("--san", action="append", required=True,
                    help="host name or IP the server is reached at (repeat)")
    ks.add_argument("--out", help="directory (default: the CA directory)")
    kn = ksub.add_parser("node", help="create NAME.key (0600) + NAME.pub for a site")
    kn.add_argument("name")
    kn.add_argument("--out", help="directory (default keys)")
    kr = ksub.add_parser("register", help="allow a node's public key on the server")
    kr.add_argument("public_key")
    kr.add_argument("--deployment", required=True)
    kr.add_argument("--label", help="a name for the node")
    ku = ksub.add_parser("unregister", help="revoke a node")
    ku.add_argument("node_id", type=int)
    ku.add_argument("--deployment", required=True)
    k.set_defaults(func=cmd_keys)


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
    items_help = ("[CONFIG.yaml] [section.key=value ...]; default config: the embedded "
                  "simulations/default.yaml")
    s = sub.add_parser("simulate", help="run a local federated simulation")
    s.add_argument("items", nargs="*", help=items_help)
    s.add_argument("--name", help="run name (default: the config file's stem)")
    s.add_argument("--run-dir", help="exact run directory to write")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or killed "
                   "run after its last completed round, with its own config")
    s.add_argument("--past-early-stop", action="store_true",
                   help=PAST_STOP_HELP)
    s.set_defaults(func=cmd_simulate)
    r = sub.add_parser("report", help="a run's report: text summary + HTML page "
                       "with plots")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (it holds "
                   "config.yaml and metrics.jsonl)")
    r.add_argument("--out", help="directory for index.html and the PNGs "
                   "(default RUN_DIR/report)")
    r.set_defaults(func=cmd_report)
    c = sub.add_parser("config", help="validate a config and its data, and print "
                       "the resolved values")
    c.add_argument("items", nargs="*", help=items_help)
    c.add_argument("--no-data-check", action="store_true",
                   help="skip reading data.source and data.test_source")
    c.add_argument("--defaults", action="store_true",
                   help="print the built-in default of every key instead")
    c.set_defaults(func=cmd_config)
    pl = sub.add_parser("plan", help="before training: each site's DP noise against "
                        "its signal, and whether it is expected to learn")
    pl.add_argument("items", nargs="*", help=items_help)
    pl.add_argument("--records", type=int, nargs="+", metavar="N",
                    help="training records of each site (a deployment); default: "
                    "the simulation's partition of data.source")
    pl.add_argument("--all", action="store_true",
                    help="one row per site (above 20 sites the plan groups them "
                    "by verdict)")
    pl.set_defaults(func=cmd_plan)
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
    a = sub.add_parser("assets", help="fetch the embedded offline model/data defaults")
    a.add_argument("names", nargs="*", help=f"default: all of {assets.names()}")
    a.set_defaults(func=cmd_assets)
    _deploy_parsers(sub)
    cli_model.add_parsers(sub)
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
