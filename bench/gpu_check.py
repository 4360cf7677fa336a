"""The GPU check, in one go: what has to hold on a CUDA device, measured.

    bash bench/gpu_check.sh           # on a machine with a CUDA device
    bash bench/gpu_check.sh --cpu     # the same path on the CPU (CI runs it)

1. ``steps``: fedtune's training step (``trainer.train_step``) with and without
   Opacus DP-SGD, for all-MiniLM-L6-v2 (classification) and SmolLM2-135M (causal
   LM), LoRA r=8, in fp32 and bf16 autocast: the median step time and DP's ratio.
2. ``moved``: one DP-SGD step through ``trainer.train_local`` on the real MiniLM
   model must change every ``lora_B`` tensor (the silent failure of Opacus #820 /
   peft #3409: loss and epsilon look normal while LoRA stays put; the trainer also
   fails such a round itself).
3. ``simulation``: a two-site ``fedtune simulate`` with ``federation.client_gpus``
   0.5 (two sites share one GPU; 0 with ``--cpu``).
4. ``worker``: a real ``fedtune server`` and one ``fedtune client --device cuda``
   (``cpu``) over TLS on 127.0.0.1 for 3 rounds: the warm site worker must load the
   base model once (``model_loads`` 1).

Writes ``bench/results/gpu_check[-cpu].json`` and ends with one summary line
(``gpu_check OK ...`` or ``gpu_check FAILED ...``); exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy_overhead import deployed_rounds, one_step_scenario, site_files  # noqa: E402
from dp_overhead import _batch, time_step  # noqa: E402
from harness import MODELS, RESULTS, device, simulate, write  # noqa: E402


def step_times(dev: torch.device, *, steps: int, length: int, batch: int
               ) -> list[dict[str, Any]]:
    from fedtune.common.model import load_tokenizer

    rows = []
    for name, raw in MODELS.items():
        tok = load_tokenizer(raw["model"]["name_or_path"],
                             raw["model"].get("gguf_file", ""))
        data = _batch(raw["model"]["task"], size=batch, length=length,
                      vocab=min(len(tok), 30000), dev=dev)
        for precision in ("fp32", "bf16"):
            times = {mode: time_step(raw, mode=mode, batch=data, steps=steps, dev=dev,
                                     precision=precision) for mode in (None, "hooks")}
            rows.append({"model": name, "precision": precision, "batch": batch,
                         "seq_len": length, "no_dp_step_s": times[None],
                         "dp_step_s": times["hooks"],
                         "dp_over_no_dp": times["hooks"] / times[None]})
            print(f"{name} {precision}: DP {times['hooks']:.3f} s, no DP "
                  f"{times[None]:.3f} s", flush=True)
    return rows


def moved(dev: torch.device) -> dict[str, Any]:
    from fedtune.client import trainer
    from fedtune.common import assets, data
    from fedtune.common.config import (
        DataConfig,
        LoraConfig,
        ModelConfig,
        PrivacyConfig,
        TrainConfig,
    )
    from fedtune.common.model import adapter_state, build_model, load_tokenizer

    mcfg = ModelConfig(name_or_path="fedtune:all-MiniLM-L6-v2")
    model = build_model(mcfg, LoraConfig(r=8, alpha=16), num_labels=3)
    tok = load_tokenizer(mcfg.name_or_path)
    recs = data.read_records(assets.resolve("fedtune:drug-reviews"),
                             required=("review", "rating"))[:64]
    dcfg = DataConfig(text_column="review", label_column="rating", max_length=64,
                      labels=["negative", "neutral", "positive"])
    train = data.encode_classification(recs, tok, cfg=dcfg)
    before = adapter_state(model)
    trainer.train_local(model, train, train, task="classification",
                        train_cfg=TrainConfig(max_steps=1, batch_size=16,
                                              learning_rate=1e-3, warmup_ratio=0.0),
                        privacy_cfg=PrivacyConfig(), noise_multiplier=1.0,
                        device=dev, pad_id=int(tok.pad_token_id), seed=0)
    after = adapter_state(model)
    lora_b = [k for k in before if "lora_B" in k]
    unmoved = [k for k in lora_b if torch.equal(before[k], after[k])]
    return {"lora_B_tensors": len(lora_b), "unmoved": unmoved, "ok": not unmoved}


def simulation(gpus: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fedtune-gpucheck-"))
    started = time.perf_counter()
    rows, wall = simulate(work / "run", [
        "federation.num_sites=2", "federation.num_rounds=1",
        "federation.min_train_nodes=2", f"federation.client_gpus={gpus}",
        "data.max_samples_per_site=64", "data.max_test_samples=64",
        "data.max_length=32"])
    last = rows[-1]
    return {"client_gpus": gpus, "rounds": len(rows),
            "clients_replied": last["clients_replied"],
            "epsilon_max": last.get("epsilon_max"), "wall_s": wall,
            "ok": last["clients_replied"] == 2,
            "measured_s": time.perf_counter() - started}


def worker(site_device: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fedtune-gpucheck-"))
    (site,) = site_files(work, 1)
    out = deployed_rounds(one_step_scenario(work), site, 3, worker=True,
                          site_device=site_device)
    return {"device": site_device, "rounds": len(out["rounds"]),
            "model_loads": out["model_loads"],
            "median_round_s": out["median_round_s"],
            "ok": out["model_loads"] == 1 and len(out["rounds"]) == 3}


def _part(name: str, run: Callable[[], Any], result: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    try:
        result[name] = run()
    except Exception as err:  # noqa: BLE001 - every part runs; the summary says which failed
        traceback.print_exc()
        result[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
    result[name + "_seconds"] = time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the same path on the CPU")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check FAILED: no CUDA device is visible (torch "
                 f"{torch.__version__}, cuda {torch.version.cuda}); run with --cpu "
                 "for the CPU path")
    dev = torch.device("cpu" if args.cpu else "cuda")
    result: dict[str, Any] = {"device": device(dev.type), "cpu_mode": args.cpu}
    _part("steps", lambda: step_times(dev, steps=2 if args.cpu else 10,
                                      length=32 if args.cpu else 128,
                                      batch=8 if args.cpu else 16), result)
    _part("moved", lambda: moved(dev), result)
    _part("simulation", lambda: simulation(0.0 if args.cpu else 0.5), result)
    _part("worker", lambda: worker(dev.type), result)
    steps = result["steps"]
    ok = {"steps": isinstance(steps, list),
          **{k: bool(result[k].get("ok")) for k in ("moved", "simulation", "worker")}}
    result["ok"] = all(ok.values())
    path = write(args.out, "gpu_check" + ("-cpu" if args.cpu else ""), result)
    ratios = (", ".join(f"{r['model'].split()[0]} {r['precision']} x"
                        f"{r['dp_over_no_dp']:.2f}" for r in steps)
              if ok["steps"] else f"FAILED ({steps.get('error')})")
    sim, wk, mv = result["simulation"], result["worker"], result["moved"]
    print(f"gpu_check {'OK' if result['ok'] else 'FAILED'} on {result['device']}: "
          f"DP/no-DP step {ratios}; adapter moved after a DP step: "
          f"{'yes' if ok['moved'] else 'NO ' + str(mv)}; simulation client_gpus "
          f"{sim.get('client_gpus', '?')}: {sim.get('clients_replied', 0)}/2 sites "
          f"{'ok' if ok['simulation'] else 'FAILED ' + str(sim.get('error', ''))}; "
          f"worker on {dev.type}: {wk.get('rounds', 0)} rounds, model_loads "
          f"{wk.get('model_loads', '?')}{'' if ok['worker'] else ' FAILED'}"
          f" -> {path}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
