"""The operator's ``fedtune`` commands: ``server`` (the SuperLink with TLS and node
auth), ``run`` (launch a run on a deployment and follow it), ``status``,
``deployment`` (name a SuperLink's Control API) and ``keys`` (the CA, the server
certificate, node keys and their registration on the SuperLink: ``keys ca``,
``keys server`` and ``keys node`` need only :mod:`fedtune.common.keys`, while
``register``/``unregister`` talk to the server's Control API, so the command lives
here). The dispatcher (:mod:`fedtune.simulations.cli`) wires them; each imports
its side lazily."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedtune.common import cliargs


def cmd_server(args: argparse.Namespace) -> int:
    from fedtune.server.operations.daemon import ServerOptions, run_server

    run_server(ServerOptions(
        certs=Path(args.certs) if args.certs else None,
        fleet_address=args.fleet_address, control_address=args.control_address,
        state_dir=Path(args.state_dir), insecure=args.insecure,
        log_file=Path(args.log_file) if args.log_file else None))
    return 0  # not reached: the process became the SuperLink


def cmd_run(args: argparse.Namespace) -> int:
    from fedtune.server.operations import control
    from fedtune.server.runtime.resume import resumed_config

    if args.resume:
        cfg = resumed_config(args.resume, items=args.items,
                             past_stop=args.past_early_stop)
        run_path: Path | None = Path(args.resume).resolve()
    else:
        cfg, _ = cliargs.load(args.items)
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


def add_parsers(sub: Any) -> None:
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
    r = sub.add_parser("run", help="launch a run on a deployment and follow it")
    r.add_argument("items", nargs="*", help="[CONFIG.yaml] [section.key=value ...]")
    r.add_argument("--deployment", required=True, help="name from `fedtune deployment`")
    r.add_argument("--run-dir", help="exact run directory on the server host "
                   "(default: a new one under the server's state dir)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a run directory "
                   "after its last completed round (run on the server host: the "
                   "directory and its state live there)")
    r.add_argument("--past-early-stop", action="store_true",
                   help=cliargs.PAST_STOP_HELP)
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
