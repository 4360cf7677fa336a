"""Deployment overhead per round: what a real SuperLink + SuperNode add to training,
with and without the warm site worker.

Flower 1.39 starts a fresh ``flwr-clientapp`` process for every message. Without the
worker (``fedtune client --no-worker``: Flower's default) each round pays a Python
start, the torch/transformers/peft/opacus imports and the model and data loads; with
it (the default), that process is a thin forwarder and the worker keeps everything
loaded. This script measures, with the default model (all-MiniLM-L6-v2) on this
machine:

1. ``cold_start``: a fresh process importing fedtune's full ClientApp and loading
   the model, tokenizer and site data (what every message paid before), and
   ``thin_start``: a fresh process importing the forwarder (what it pays now);
2. ``deployed``: a real ``fedtune server`` + one ``fedtune client`` over TLS on
   127.0.0.1, one DP-SGD step per round, in both modes: overhead = round wall time
   minus the site's training time, the base-model loads over the run (from the
   site's log), and the worker's own time per task;
3. ``parity`` (not with ``--quick``): three sites, FedAvg vs SecAgg+ vs central DP
   round times on the deployment engine, with the worker.

    python bench/deploy_overhead.py [--quick] [--rounds 5] [--out bench/results]

What is left of the overhead with the worker is Flower's own fixed waits
(``flwr/supernode/start_client_internal.py``: the SuperNode sleeps 3 s whenever a
pull finds no message and 0.5 s between checks for a reply; the SuperExec's task
poll, ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, which fedtune sets to 0.1 s) plus the
thin process's start; fedtune's ServerApp polls replies every 0.25 s instead of
Flower's 3 s (:mod:`fedtune.server.runtime.polling`).
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import device, write  # noqa: E402

from tests.integration.cluster import Cluster, metrics, wait_for  # noqa: E402

COLD = """
import time; t0 = time.perf_counter()
import fedtune.client.app
from fedtune.client import site
t1 = time.perf_counter()
from fedtune.common import config, model
cfg = config.load({cfg!r}, [])
model.build_model(cfg.model, cfg.lora, num_labels=len(cfg.data.labels), seed=0)
model.load_tokenizer(cfg.model.name_or_path, cfg.model.gguf_file)
site.site_data(cfg, {{"data-path": {data!r}}})
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""
THIN = "import fedtune.client.node.forwarder"
STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
SERVED = re.compile(STAMP + r" INFO fedtune\.client\.worker: train task of run \d+ "
                    r"served in ([0-9.]+) s")
ROUND = re.compile(STAMP + r" INFO fedtune\.server\.rounds: \[ROUND (\d+)/\d+\]")


def _clock(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def timeline(server_log: str, site_log: str) -> list[dict]:
    """Per round, from the ServerApp's and the worker's timestamps (one clock on
    this machine): ``dispatch_s`` = round start -> the worker starts the task
    (server push, the SuperNode's pull wait, SuperExec poll, thin ClientApp start,
    forwarding); ``return_s`` = task end -> next round start (reply wait and push,
    the server's poll, aggregation, central evaluation, checkpoint)."""
    starts = {int(r): _clock(t) for t, r in ROUND.findall(server_log)}
    tasks = [(_clock(t) - float(s), _clock(t), float(s))
             for t, s in SERVED.findall(site_log)]
    out = []
    for rnd in sorted(starts):
        mine = [t for t in tasks if t[0] >= starts[rnd]]
        if not mine:
            break
        began, ended, took = mine[0]
        row = {"round": rnd, "dispatch_s": began - starts[rnd], "worker_s": took}
        if rnd + 1 in starts:
            row["return_s"] = starts[rnd + 1] - ended
        out.append(row)
    return out


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


def thin_start(repeats: int) -> dict:
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", THIN], check=True)
        walls.append(time.perf_counter() - t0)
    return {"wall_s": statistics.median(walls), "repeats": repeats}


def _cluster(root: Path, sites: dict[str, Path], *, worker: bool,
             site_device: str = "cpu") -> Cluster:
    c = Cluster(root)
    c.fedtune("keys", "ca", "--out", str(c.certs))
    c.fedtune("keys", "server", "--ca", str(c.certs), "--san", "127.0.0.1")
    for name in sites:
        c.fedtune("keys", "node", name, "--out", str(c.keys))
    c.start_server()
    c.fedtune("deployment", "add", "test", "--control", c.control, "--ca-cert",
              str(c.certs / "ca.crt"))
    for name, data in sites.items():
        c.fedtune("keys", "register", str(c.keys / f"{name}.pub"), "--deployment",
                  "test")
        c.start_node(name, data, extra=("--device", site_device,
                                        *(() if worker else ("--no-worker",))))
    wait_for(lambda: c.online() == len(sites), timeout=120, what="the nodes")
    return c


def _run(c: Cluster, cfg: Path, root: Path, tag: str, *items: str
         ) -> tuple[list[dict], str]:
    """The run's metrics rows and its ServerApp log."""
    run_dir = root / f"run-{tag}"
    proc = c.fedtune("run", str(cfg), *items, "--deployment", "test", "--run-dir",
                     str(run_dir), timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return metrics(run_dir)[1:], proc.stdout + proc.stderr


def deployed_rounds(cfg: Path, data: Path, rounds: int, *, worker: bool,
                    site_device: str = "cpu") -> dict:
    """``rounds`` of a real server and one site (``--device site_device``)."""
    root = Path(tempfile.mkdtemp(prefix="fedtune-bench-"))
    c = _cluster(root, {"h1": data}, worker=worker, site_device=site_device)
    try:
        rows, server_log = _run(c, cfg, root, "overhead",
                                f"federation.num_rounds={rounds}")
        log = c.log("h1")
    finally:
        c.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    per_round = [{"round": r["round"], "round_s": r["round_seconds"],
                  "train_s": r["client_train_seconds_sum"],
                  "server_eval_s": r.get("eval_seconds", 0.0),
                  "overhead_s": r["round_seconds"] - r["client_train_seconds_sum"]}
                 for r in rows]
    served = [float(s) for _, s in SERVED.findall(log)]
    return {"worker": worker, "rounds": per_round,
            "timeline": timeline(server_log, log) if worker else [],
            "median_overhead_s": statistics.median(r["overhead_s"] for r in per_round),
            "median_round_s": statistics.median(r["round_s"] for r in per_round),
            "median_train_s": statistics.median(r["train_s"] for r in per_round),
            "model_loads": log.count("loading the base model"),
            "clientapp_processes": log.count("Start `flwr-clientapp` process"),
            "worker_task_s": served}


def parity(cfg: Path, data: list[Path], rounds: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="fedtune-bench-"))
    c = _cluster(root, {f"h{i + 1}": d for i, d in enumerate(data)}, worker=True)
    variants = {"fedavg": (), "secagg+": ("federation.secure_aggregation=true",
                                          "federation.secagg_threshold=2"),
                "central-dp": ("privacy.central_dp=true",)}
    out = {}
    try:
        for name, items in variants.items():
            rows, _ = _run(c, cfg, root, name, f"federation.num_rounds={rounds}",
                        "federation.num_sites=3", "federation.min_train_nodes=3",
                        *items)
            out[name] = {"round_s": [r["round_seconds"] for r in rows],
                         "median_round_s": statistics.median(
                             r["round_seconds"] for r in rows),
                         "clients_replied": [r["clients_replied"] for r in rows]}
    finally:
        c.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    return out


def site_files(work: Path, count: int) -> list[Path]:
    """``count`` sites of 64 shipped drug reviews each."""
    from fedtune.common import assets

    reviews = Path(assets.resolve("fedtune:drug-reviews")).read_text().splitlines()
    out = []
    for i in range(count):
        out.append(work / f"site{i}.jsonl")
        out[-1].write_text("\n".join(reviews[64 * i:64 * (i + 1)]) + "\n")
    return out


def one_step_scenario(work: Path) -> Path:
    """The drug-reviews scenario at one DP step a round, one site, 64 test records:
    a round's cost is then mostly what the deployment adds."""
    scenario = yaml.safe_load((ROOT / "simulations" / "drug-reviews.yaml").read_text())
    scenario["train"].update({"max_steps": 1, "local_epochs": 1})
    scenario["federation"].update({"num_sites": 1, "min_train_nodes": 1})
    scenario["data"]["max_test_samples"] = 64
    cfg = work / "bench.yaml"
    cfg.write_text(yaml.safe_dump(scenario))
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-parity", action="store_true",
                   help="skip the 3-site FedAvg/SecAgg+/central-DP comparison")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.repeats = 2, 1
    work = Path(tempfile.mkdtemp(prefix="fedtune-bench-data-"))
    data = site_files(work, 3)
    cfg = one_step_scenario(work)
    result = {
        "device": device(),
        "python": platform.python_version(),
        "cold_start": cold_start(cfg, data[0], args.repeats),
        "thin_start": thin_start(args.repeats),
        "quick": args.quick,
        "deployed": [deployed_rounds(cfg, data[0], args.rounds, worker=w)
                     for w in (False, True)],
        "parity": {} if args.quick or args.no_parity else parity(cfg, data,
                                                                   args.rounds),
    }
    path = write(args.out, "deploy_overhead" + ("-quick" if args.quick else ""),
                 result)
    cs, th = result["cold_start"], result["thin_start"]
    print(f"full ClientApp cold start (median of {cs['repeats']}): {cs['wall_s']:.2f} "
          f"s = imports {cs['imports_s']:.2f} s + model/tokenizer/data "
          f"{cs['model_data_load_s']:.2f} s + interpreter; thin forwarder start "
          f"{th['wall_s']:.2f} s")
    print(f"{'mode':>10} | {'round s':>8} | {'train s':>8} | {'overhead s':>10} | "
          f"{'model loads':>11}")
    for d in result["deployed"]:
        mode = "worker" if d["worker"] else "no-worker"
        print(f"{mode:>10} | {d['median_round_s']:>8.2f} | {d['median_train_s']:>8.2f}"
              f" | {d['median_overhead_s']:>10.2f} | {d['model_loads']:>11d}")
    for t in result["deployed"][1]["timeline"]:
        print(f"worker round {t['round']}: dispatch {t['dispatch_s']:.2f} s, worker "
              f"{t['worker_s']:.2f} s, return {t.get('return_s', float('nan')):.2f} s")
    for name, v in result["parity"].items():
        print(f"3 sites, {name:>10}: median round {v['median_round_s']:.2f} s "
              f"({', '.join(f'{s:.1f}' for s in v['round_s'])})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
