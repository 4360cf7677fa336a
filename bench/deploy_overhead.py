"""Deployment overhead per round: what a real SuperLink + SuperNode add to training.

In deployment Flower starts a fresh ``flwr-clientapp`` process for every message, so
each round pays a Python start, the torch/transformers/peft/opacus imports and the
base-model load before the site trains. This script measures, with the default model
(all-MiniLM-L6-v2) on this machine:

1. ``cold_start``: a fresh process importing fedtune's ClientApp and loading the base
   model, tokenizer and site data (the ClientApp's share of the overhead);
2. ``round``: a real ``fedtune server`` + one ``fedtune client`` over TLS on
   127.0.0.1, training one DP-SGD step per round; overhead = round wall time minus
   the site's training time, with Flower's default SuperExec task poll (1.0 s) and
   with the 0.1 s fedtune sets.

    python bench/deploy_overhead.py [--quick] [--rounds 3] [--out bench/results]

``--quick``: 2 rounds, one cold-start repeat, only fedtune's 0.1 s poll.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import device, write  # noqa: E402

from tests.integration.cluster import Cluster, metrics, wait_for  # noqa: E402

COLD = """
import time; t0 = time.perf_counter()
import fedtune.client.app as app
t1 = time.perf_counter()
from fedtune.common import config, model
cfg = config.load({cfg!r}, [])
model.build_model(cfg.model, cfg.lora, num_labels=len(cfg.data.labels), seed=0)
model.load_tokenizer(cfg.model.name_or_path, cfg.model.gguf_file)
app.site_data(cfg, {{"data-path": {data!r}}})
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def cold_start(cfg: Path, data: Path, repeats: int) -> dict:
    rows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", COLD.format(cfg=str(cfg),
                                                                data=str(data))],
                             capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        imports, load = map(float, out.stdout.split()[-2:])
        rows.append({"wall_s": wall, "imports_s": imports, "model_data_load_s": load})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} | {
        "repeats": repeats}


def deployed_rounds(cfg: Path, data: Path, rounds: int, poll: str) -> dict:
    root = Path(tempfile.mkdtemp(prefix="fedtune-bench-"))
    c = Cluster(root)
    c.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = poll
    try:
        c.fedtune("keys", "ca", "--out", str(c.certs))
        c.fedtune("keys", "server", "--ca", str(c.certs), "--san", "127.0.0.1")
        c.fedtune("keys", "node", "h1", "--out", str(c.keys))
        c.start_server()
        c.fedtune("deployment", "add", "test", "--control", c.control, "--ca-cert",
                  str(c.certs / "ca.crt"))
        c.fedtune("keys", "register", str(c.keys / "h1.pub"), "--deployment", "test")
        c.start_node("h1", data)
        wait_for(lambda: c.online() == 1, timeout=90, what="the node")
        run_dir = root / "run"
        proc = c.fedtune("run", str(cfg), f"federation.num_rounds={rounds}",
                         "--deployment", "test", "--run-dir", str(run_dir),
                         timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
        rows = metrics(run_dir)[1:]
        per_round = [{"round": r["round"], "round_s": r["round_seconds"],
                      "train_s": r["client_train_seconds_sum"],
                      "overhead_s": r["round_seconds"] - r["client_train_seconds_sum"]}
                     for r in rows]
        return {"poll_interval_s": float(poll), "rounds": per_round,
                "median_overhead_s": statistics.median(
                    r["overhead_s"] for r in per_round),
                "median_round_over_train": statistics.median(
                    r["round_s"] / r["train_s"] for r in per_round)}
    finally:
        c.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.repeats = 2, 1
    work = Path(tempfile.mkdtemp(prefix="fedtune-bench-data-"))
    from fedtune.common import assets

    reviews = Path(assets.resolve("fedtune:drug-reviews")).read_text().splitlines()
    data = work / "site.jsonl"
    data.write_text("\n".join(reviews[:64]) + "\n")
    scenario = yaml.safe_load((ROOT / "simulations" / "drug-reviews.yaml").read_text())
    scenario["train"].update({"max_steps": 1, "local_epochs": 1})
    scenario["federation"].update({"num_sites": 1, "min_train_nodes": 1})
    scenario["data"]["max_test_samples"] = 64
    cfg = work / "bench.yaml"
    cfg.write_text(yaml.safe_dump(scenario))
    result = {
        "device": device(),
        "python": platform.python_version(),
        "cold_start": cold_start(cfg, data, args.repeats),
        "quick": args.quick,
        "deployed": [deployed_rounds(cfg, data, args.rounds, poll)
                     for poll in (("0.1",) if args.quick else ("1.0", "0.1"))],
    }
    path = write(args.out, "deploy_overhead" + ("-quick" if args.quick else ""),
                 result)
    cs = result["cold_start"]
    print(f"ClientApp cold start (median of {cs['repeats']}): {cs['wall_s']:.2f} s "
          f"= imports {cs['imports_s']:.2f} s + model/tokenizer/data "
          f"{cs['model_data_load_s']:.2f} s + interpreter")
    print(f"{'task poll':>10} | {'round s':>8} | {'train s':>8} | {'overhead s':>10}")
    for d in result["deployed"]:
        for r in d["rounds"]:
            print(f"{d['poll_interval_s']:>10.1f} | {r['round_s']:>8.2f} | "
                  f"{r['train_s']:>8.2f} | {r['overhead_s']:>10.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
