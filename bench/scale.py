"""Scale: up to 10,000 virtual sites in one simulation, with a tiny model.

    python bench/scale.py [--quick] [--clients 10,100,1000] [--rounds 3]
                          [--per-round 10] [--per-site 4] [--out DIR]
    python bench/scale.py --runs 100:100,1000:100,10000:100,10000:50 --name scale-10k

``--runs`` lists ``SITES:SAMPLED`` pairs (sites, and sites sampled per round);
without it, every ``--clients`` size samples ``--per-round``. ``--name``: the
result file's name.

Each run is ``fedtune simulate`` with N virtual SuperNodes in Flower's simulation
engine: a 2-layer, 32-wide random BERT (the MiniLM tokenizer, so real text), IID
partitions of ``--per-site`` drug reviews per site (the shipped reviews, resampled
to N x per-site records), DP-SGD on, and ``--per-round`` sites sampled per round
(``fraction_train`` = per-round / N). Reported against N: the peak memory of the
whole process tree (driver, Ray's GCS and raylet, the actors), sampled every 0.2 s
as the sum of each process's proportional set size (PSS, so pages shared between
processes count once), the median wall time of the rounds after the first (which
also pays the actors' cold start), and the process's wall time.
Memory must not grow with N: only the sampled sites' models exist at any time.
``--quick``: 2 rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

from harness import RESULTS, device, simulate, table, write


def tiny_model(out: Path) -> Path:
    """A random 2-layer, 32-wide BERT saved like a hub model, with MiniLM's
    tokenizer (loaded through the same ``from_pretrained`` path as any model)."""
    import torch
    from transformers import BertConfig, BertModel

    from fedtune.common.model import load_tokenizer

    tok = load_tokenizer("fedtune:all-MiniLM-L6-v2")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def site_data(out: Path, records: int) -> Path:
    """``records`` drug reviews drawn (with replacement) from the shipped set."""
    from fedtune.common import assets

    src = Path(assets.resolve("fedtune:drug-reviews"))  # the training file
    rows = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rng = random.Random(0)
    out.write_text("\n".join(rng.choice(rows) for _ in range(records)) + "\n",
                   encoding="utf-8")
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


class PeakMemory:
    """Samples the PSS sum of this process's descendants (not itself) until
    stopped; ``peak_mib`` is the largest sum seen."""

    def __init__(self, interval: float = 0.2) -> None:
        import os

        self.root, self.interval, self.peak_kib = os.getpid(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [p for p in _tree(self.root) if p != self.root]
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024


def run(n: int, *, rounds: int, per_round: int, per_site: int, work: Path,
        model: Path) -> dict[str, Any]:
    data = site_data(work / f"train-{n}.jsonl", n * per_site)
    overrides = [
        f"model.name_or_path={model}", f"data.source={data}",
        "data.max_test_samples=200", "data.partition=iid", "data.val_fraction=0",
        "data.max_length=64", "train.batch_size=4", "train.local_epochs=1",
        f"federation.num_sites={n}", f"federation.num_rounds={rounds}",
        f"federation.fraction_train={min(1.0, per_round / n)}",
        f"federation.min_train_nodes={min(n, per_round)}"]
    with PeakMemory() as mem:
        rows, wall = simulate(work / f"run-{n}-{per_round}", overrides)
    return {"clients": n, "sampled_per_round": rows[-1]["clients_sampled"],
            "records_per_site": per_site, "rounds": len(rows),
            "peak_pss_mib": mem.peak_mib,
            # round 1 also pays the actors' cold start (imports, first model load)
            "median_round_s": statistics.median(r["round_seconds"]
                                                for r in (rows[1:] or rows)),
            "round_s": [r["round_seconds"] for r in rows], "process_wall_s": wall,
            # start-up (data, plan, Ray, N virtual nodes), evaluation, calibration
            "outside_rounds_s": wall - sum(r["round_seconds"] for r in rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clients", default="10,100,1000")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--per-site", type=int, default=4)
    p.add_argument("--runs", help="SITES:SAMPLED,... (overrides --clients and "
                   "--per-round)")
    p.add_argument("--name", default="scale")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    rounds = 2 if args.quick else args.rounds
    work = Path(tempfile.mkdtemp(prefix="fedtune-scale-"))
    model = tiny_model(work / "tiny-bert")
    runs = ([tuple(int(v) for v in x.split(":")) for x in args.runs.split(",")]
            if args.runs else
            [(int(x), args.per_round) for x in args.clients.split(",")])
    results = []
    for n, per_round in runs:
        results.append(run(n, rounds=rounds, per_round=per_round,
                           per_site=args.per_site, work=work, model=model))
        print(json.dumps(results[-1]), flush=True)
    base = results[0]
    path = write(args.out, args.name + ("-quick" if args.quick else ""), {
        "device": device(), "quick": args.quick, "model": "2-layer 32-wide BERT",
        "memory_growth_largest_over_smallest":
            max(r["peak_pss_mib"] for r in results) / base["peak_pss_mib"],
        "results": results})
    print(table(["clients", "sampled/round", "peak PSS MiB", "vs smallest",
                 "median round s", "outside rounds s", "process s"],
                [[r["clients"], r["sampled_per_round"], r["peak_pss_mib"],
                  r["peak_pss_mib"] / base["peak_pss_mib"], r["median_round_s"],
                  r["outside_rounds_s"], r["process_wall_s"]] for r in results]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
