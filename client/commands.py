"""The site's ``fedtune`` commands: ``client`` (this hospital's daemon, a
SuperNode with its warm site worker) and ``privacy`` (the site's ledger). The
dispatcher (:mod:`fedtune.simulations.cli`) wires them; each imports its side
lazily, so ``fedtune --help`` loads no torch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


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
        allow_non_private=args.allow_non_private, label=args.label or ""))


def cmd_privacy(args: argparse.Namespace) -> int:
    from fedtune.client.ledger import summarize

    rows = summarize(Path(args.ledger_dir))
    if not rows:
        print(f"no ledger in {args.ledger_dir}")
    for r in rows:
        budget = "no limit" if r["budget"] is None else f"{r['budget']:g}"
        left = "-" if r["remaining"] is None else f"{r['remaining']:.3f}"
        print(f"dataset {r['dataset'][:12]}  {r['records']} records  "
              f"{len(r['runs'])} runs  {r['releases']} releases  total epsilon "
              f"{r['epsilon']:.3f} (delta {r['delta']:g})  budget {budget}  "
              f"remaining {left}")
        for run in r["runs"]:
            kinds = ", ".join(f"{n} {kind}{'s' if n > 1 else ''}"
                              for kind, n in run["releases"].items())
            print(f"  run {run['run']}{' ' + run['name'] if run['name'] else ''}:"
                  f" epsilon {run['epsilon']:.3f}  ({kinds}; last {run['last']})")
    return 0


def add_client_parser(sub: Any) -> None:
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
    c.add_argument("--label", help="this site's name in the operator's logs, metrics "
                   "and report (sent with every update; not secret), where the "
                   "operator registered none")
    c.set_defaults(func=cmd_client)


def add_privacy_parser(sub: Any) -> None:
    pv = sub.add_parser("privacy", help="a site's privacy ledger")
    pvsub = pv.add_subparsers(dest="action", required=True)
    ps = pvsub.add_parser("show", help="each run (the operator's run id and name) "
                          "with its releases and epsilon, the total and what remains")
    ps.add_argument("--ledger-dir", required=True)
    pv.set_defaults(func=cmd_privacy)
