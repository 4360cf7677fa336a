"""The ``fedtune`` commands run after a run, on its directory: ``report`` (text
summary + HTML page), ``export``, ``predict``, ``evaluate`` (score a labelled
file), ``compare`` (runs side by side) and ``audit`` (train with planted
canaries, then attack: the privacy the accountant promises, checked). None of
them writes into the run directory but ``report``'s page. The dispatcher
(:mod:`fedtune.simulations.cli`) wires them; ``audit`` is handed the simulation
to train with (:func:`add_parsers`' ``train``), since the server does not know
the simulation engine."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune.common import cliargs
from fedtune.common.config import RunConfig

Train = Callable[[RunConfig, Path], Path]  # (config, run directory) -> run directory

ROUND_HELP = ("which round: best (the default; final when the run recorded no "
              "best round), final, or a round number")


def cmd_export(args: argparse.Namespace) -> int:
    from fedtune.server.tools.export import export

    done = export(args.run_dir, out=args.out, which=args.round, merge=args.merge,
                  quantize=args.quantize or "")
    print(f"exported round {done['round']} ({done['kind']}) to {done['out']}: "
          f"{done['bytes'] / 1e6:.1f} MB")
    for name, size in done["files"].items():
        print(f"  {name:<36} {size / 1e6:9.2f} MB")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fedtune.server.tools.predict import predict_file

    out: Any = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        n = predict_file(args.source, args.input, out=out, which=args.round,
                         device=args.device, batch_size=args.batch_size,
                         progress=not args.quiet)
    finally:
        if args.out:
            out.close()
    print(f"{n} predictions" + (f" -> {args.out}" if args.out else ""),
          file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedtune.server.tools import plots
    from fedtune.server.tools.predict import evaluate_file, report_lines

    result = evaluate_file(args.run_dir, args.data, which=args.round,
                           device=args.device, batch_size=args.batch_size)
    print("\n".join(report_lines(result)))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(
            {"source": str(args.run_dir), "data": args.data, "round": args.round,
             **result}, indent=2) + "\n")
        if "confusion" in result:
            (out / "confusion.png").write_bytes(plots.confusion(
                result["confusion"], result["labels"],
                title=f"{Path(args.data).name}: confusion matrix "
                f"(macro-F1 {result['macro-f1']:.3f})"))
        print(f"written: {out / 'evaluation.json'}"
              + (f", {out / 'confusion.png'}" if "confusion" in result else ""))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedtune.server.tools.compare import compare, lines

    result = compare(args.run_dirs, resamples=args.resamples, device=args.device)
    print("\n".join(lines(result)))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedtune.server.tools.report import write_report

    page, text = write_report(args.run_dir, args.out)
    print(text)
    print(f"report: {page}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from fedtune.server.tools.audit import run_audit

    cfg, name = cliargs.load(args.items)
    out = Path(args.out or f"audits/{name}-{'dp' if cfg.privacy.enabled else 'nodp'}")
    r = run_audit(cfg, out_dir=out, canaries=args.canaries,
                  train=args.train)
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


def add_report_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="a run's report: text summary + HTML page "
                       "with plots")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (it holds "
                   "config.yaml and metrics.jsonl)")
    r.add_argument("--out", help="directory for index.html and the PNGs "
                   "(default RUN_DIR/report)")
    r.set_defaults(func=cmd_report)


def add_parsers(sub: Any, *, train: Train) -> None:
    """``audit``, ``compare``, ``export``, ``predict``, ``evaluate``."""
    au = sub.add_parser("audit", help="train a federation with planted canaries, then "
                        "attack it (membership inference): the privacy the "
                        "accountant promises, checked empirically")
    au.add_argument("items", nargs="*", help="[CONFIG.yaml] [section.key=value ...]")
    au.add_argument("--canaries", type=int, default=100,
                    help="canaries planted (and as many held out)")
    au.add_argument("--out", help="output directory (default audits/NAME-dp|nodp)")
    au.set_defaults(func=cmd_audit, train=train)
    co = sub.add_parser("compare", help="runs side by side, with a paired bootstrap "
                        "interval of their macro-F1 difference on the common test set")
    co.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    co.add_argument("--resamples", type=int, default=2000)
    co.add_argument("--device", default="auto")
    co.add_argument("--out", help="also write the comparison as JSON here")
    co.set_defaults(func=cmd_compare)
    ex = sub.add_parser("export", help="a run's best/final/round-K adapter as a "
                        "deployable model (PEFT adapter, merged HF model, int8)")
    ex.add_argument("run_dir", metavar="RUN_DIR")
    ex.add_argument("--round", help=ROUND_HELP)
    ex.add_argument("--out", required=True, help="new directory to write")
    ex.add_argument("--merge", action="store_true", help="merge LoRA into the base "
                    "weights: a Hugging Face model directory that runs without "
                    "fedtune (fedtune_standalone.py)")
    ex.add_argument("--quantize", choices=["int8"], help="with --merge: dynamic int8 "
                    "quantization of the linear layers (CPU inference)")
    ex.set_defaults(func=cmd_export)
    pr = sub.add_parser("predict", help="run a trained model on new records")
    pr.add_argument("source", metavar="RUN_DIR|EXPORT_DIR")
    pr.add_argument("--input", required=True, help="JSONL / CSV / TSV with the "
                    "training text (or prompt) column, a .txt of one record per "
                    "line, or - for stdin")
    pr.add_argument("--out", help="JSON lines file (default: stdout)")
    pr.add_argument("--round", help=ROUND_HELP)
    pr.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    pr.add_argument("--batch-size", type=int, default=0,
                    help="records per batch (default train.eval_batch_size)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_predict)
    ev = sub.add_parser("evaluate", help="score a labelled file: per-class "
                        "precision/recall/F1 and the confusion matrix")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument("--data", required=True, help="labelled JSONL / CSV / TSV (the "
                    "training columns)")
    ev.add_argument("--round", help=ROUND_HELP)
    ev.add_argument("--out", help="directory for evaluation.json and confusion.png "
                    "(never the run directory's own files)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--batch-size", type=int, default=0)
    ev.set_defaults(func=cmd_evaluate)
