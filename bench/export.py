"""What `fedtune export` hands a hospital: sizes, and what int8 costs and buys.

    fedtune simulate --run-dir runs/bench-default    # the main job (3-5 min)
    python bench/export.py runs/bench-default        # ~1 min on 2 cores

Exports the run's best round three ways (PEFT adapter, merged fp32, merged int8),
then runs the merged fp32 and int8 models through the export's own standalone
loader (no fedtune code in the loop) on the run's held-out set: macro-F1, accuracy,
how often int8 agrees with fp32, and CPU throughput (records/s, best of
``--repeats`` passes, batch ``--batch``). Writes ``bench/results/export.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import RESULTS, device, table, write


def _throughput(model: Any, texts: list[str], *, batch: int, repeats: int
                ) -> tuple[list[str], float]:
    best, labels = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = []
        for i in range(0, len(texts), batch):
            out += model(texts[i:i + batch])
        best = min(best, time.perf_counter() - t0)
        labels = [o["label"] for o in out]
    return labels, len(texts) / best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished classification run directory")
    p.add_argument("--round", default=None, help="best (default), final or K")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    import torch

    from fedtune.common import data, metrics, standalone
    from fedtune.server.runtime.trained import resolve
    from fedtune.server.tools.export import export

    trained = resolve(args.run_dir, args.round)
    cfg = trained.cfg
    if cfg.model.task != "classification" or not cfg.data.test_source:
        raise SystemExit("bench/export.py measures a classification run with a "
                         "held-out set (data.test_source)")
    records = data.read_records(cfg.data.test_source, required=data.required_columns(
        cfg.model.task, cfg.data))[: cfg.data.max_test_samples or None]
    texts = [str(r[cfg.data.text_column]) for r in records]
    truth = data.label_ids(records, column=cfg.data.label_column,
                           labels=cfg.data.labels, source=cfg.data.test_source)
    rows, sizes, scores = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, merge, quant in (("adapter", False, ""), ("merged fp32", True, ""),
                                   ("merged int8", True, "int8")):
            done = export(args.run_dir, out=Path(tmp) / kind.replace(" ", "-"),
                          which=args.round, merge=merge, quantize=quant)
            sizes[kind] = done["bytes"]
            if not merge:
                continue
            model = standalone.load(done["out"])
            labels, rate = _throughput(model, texts, batch=args.batch,
                                       repeats=args.repeats)
            pred = [list(cfg.data.labels).index(x) for x in labels]
            scores[kind] = {"pred": pred, "records_per_s": rate, **{
                k: v for k, v in metrics.classification_report(
                    truth, pred, labels=list(cfg.data.labels)).items()
                if k in ("accuracy", "macro-f1")}}
    fp32, int8 = scores["merged fp32"], scores["merged int8"]
    agree = sum(a == b for a, b in zip(fp32["pred"], int8["pred"], strict=True))
    for kind in sizes:
        s = scores.get(kind, {})
        rows.append([kind, sizes[kind] / 1e6, s.get("macro-f1", "-"),
                     s.get("accuracy", "-"), s.get("records_per_s", "-")])
    print(f"round {trained.round} of {args.run_dir} on {len(texts)} held-out records, "
          f"{device()}, torch threads {torch.get_num_threads()}")
    print(table(["export", "MB", "macro-F1", "accuracy", "records/s"], rows))
    print(f"int8 vs fp32: size x{sizes['merged int8'] / sizes['merged fp32']:.3f}, "
          f"speed x{int8['records_per_s'] / fp32['records_per_s']:.2f}, macro-F1 "
          f"{int8['macro-f1'] - fp32['macro-f1']:+.4f}, same prediction on "
          f"{agree / len(texts):.1%} of records")
    path = write(args.out, "export", {
        "device": device(), "run_dir": str(args.run_dir), "round": trained.round,
        "records": len(texts), "batch": args.batch, "repeats": args.repeats,
        "bytes": sizes, "torch_threads": torch.get_num_threads(),
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "pred"}
                    for k, v in scores.items()},
        "int8_over_fp32": {
            "size": sizes["merged int8"] / sizes["merged fp32"],
            "speed": int8["records_per_s"] / fp32["records_per_s"],
            "macro_f1_change": int8["macro-f1"] - fp32["macro-f1"],
            "accuracy_change": int8["accuracy"] - fp32["accuracy"],
            "agreement": agree / len(texts)}})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
