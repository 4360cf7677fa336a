"""What every bench script shares: running ``fedtune simulate`` in a subprocess,
reading its metrics, naming the device, writing the JSON results, printing a table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# The framework benchmarks (overhead, strategies, SecAgg+, deployment, scale) run the
# drug-review scenario their figures were measured on; privacy_utility and
# dp_recipe run the main job, simulations/default.yaml.
DEFAULT = ROOT / "simulations" / "drug-reviews.yaml"
MAIN = ROOT / "simulations" / "default.yaml"
# The two default models as config sections (simulations/default.yaml, causal-lm.yaml)
MODELS = {
    "all-MiniLM-L6-v2 (classification)": {
        "model": {"name_or_path": "fedtune:all-MiniLM-L6-v2",
                  "task": "classification"},
        "lora": {"r": 8, "alpha": 16}},
    "SmolLM2-135M (causal LM)": {
        "model": {"name_or_path": "fedtune:SmolLM2-135M-Instruct",
                  "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                  "task": "causal-lm"},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
}


def device(name: str = "cpu") -> str:
    """The machine in words: CPU count, or the CUDA device's name."""
    import torch

    if name.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (f"cpu: {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
            f" (torch {torch.__version__})")


def sync(dev: Any) -> None:
    """Wait for a CUDA device's queued work (a step's time is then its own)."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def simulate(run_dir: Path, overrides: Sequence[str], *,
             scenario: Path = DEFAULT) -> tuple[list[dict[str, Any]], float]:
    """``fedtune simulate SCENARIO overrides --run-dir RUN_DIR``: (the rows of
    metrics.jsonl with round > 0, wall seconds). Exits with the run's stderr on
    failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.simulations.cli", "simulate", str(scenario),
         *overrides, "--run-dir", str(run_dir)],
        capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"fedtune simulate {' '.join(overrides)} failed:\n"
                         f"{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in
            (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["round"] > 0], time.perf_counter() - t0


def write(out: str | Path, name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the date) as ``OUT/NAME.json``; returns the path."""
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": time.strftime("%Y-%m-%d %H:%M"), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats get 4 significant digits."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
              for r in cells]
    return "\n".join(lines)
