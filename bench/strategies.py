"""Aggregation strategies and LoRA options on the drug-review task, same seeds.

    python bench/strategies.py [--rounds 5] [--only fedavg,int8] [--out bench/results]
                               [--set privacy.enabled=false --tag nodp]

Runs ``simulations/drug-reviews.yaml`` (8 non-IID hospitals, DP-SGD at epsilon 8) once
per variant through Flower's simulation engine and reports the final central accuracy,
macro-F1 and eval loss, the bytes one site sends per round (the adapter payload as
sent, and Flower's serialized record), the bytes the server sends per round, and the
median round time. Every run uses the same data split and ``train.seed``; the DP
noise is drawn from the OS's entropy (the default), so repeated runs differ by it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from harness import RESULTS, device, simulate, write

VARIANTS: dict[str, list[str]] = {
    "fedavg": [],
    "fedprox": ["federation.strategy=fedprox", "federation.proximal_mu=0.01"],
    "fedadam": ["federation.strategy=fedadam"],
    "ffa-lora": ["lora.ffa=true"],
    "int8": ["federation.compression=int8"],
    "fp16": ["federation.compression=fp16"],
}


def run(name: str, rounds: int, work: Path, extra: list[str]) -> dict:
    rows, wall = simulate(work / name, [f"federation.num_rounds={rounds}", *extra,
                                        *VARIANTS[name]])
    last = rows[-1]
    sites = last["clients_replied"] or 1
    return {"variant": name, "overrides": VARIANTS[name],
            "wall_s": wall,
            "final_eval_accuracy": last["eval_accuracy"],
            "final_eval_macro_f1": last["eval_macro_f1"],
            "final_eval_loss": last["eval_loss"],
            "epsilon_max": last["epsilon_max"],
            "payload_bytes_per_site": last["adapter_payload_bytes"],
            "wire_bytes_up_per_site": last["bytes_received"] / sites,
            "wire_bytes_down_per_site": last["bytes_sent"] / max(
                1, last["clients_sampled"]),
            "median_round_s": statistics.median(r["round_seconds"] for r in rows),
            "eval_loss_by_round": [r["eval_loss"] for r in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every variant (e.g. privacy.enabled=false)")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedtune-strategies-"))
    results = [run(n, args.rounds, work, args.set) for n in args.only.split(",")]
    write(args.out, f"strategies-{args.tag}" if args.tag else "strategies",
          {"device": device(), "task": "drug-reviews.yaml", "rounds": args.rounds,
           "overrides": args.set, "results": results})
    base = next((r for r in results if r["variant"] == "fedavg"), results[0])
    print(f"{'variant':>9} | {'acc':>5} | {'F1':>5} | {'loss':>6} | "
          f"{'payload B/site':>14} | {'vs fedavg':>9} | {'round s':>7}")
    for r in results:
        print(f"{r['variant']:>9} | {r['final_eval_accuracy']:.3f} | "
              f"{r['final_eval_macro_f1']:.3f} | {r['final_eval_loss']:.4f} | "
              f"{r['payload_bytes_per_site']:>14,} | "
              f"{r['payload_bytes_per_site'] / base['payload_bytes_per_site']:>9.2f} | "
              f"{r['median_round_s']:>7.1f}")


if __name__ == "__main__":
    main()
