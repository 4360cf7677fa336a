"""bench/run_all end to end: the six quick benchmarks run, write their JSON, and the
summary names every headline ratio."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["communication", "dp_overhead", "framework_overhead", "privacy_utility",
         "scale", "deploy_overhead"]


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(1800)
def test_run_all_quick(tmp_path: Path) -> None:
    # Execute
    proc = subprocess.Popen(["bash", str(ROOT / "bench" / "run_all"), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            env={**os.environ, "PYTHON": sys.executable})
    try:
        out, _ = proc.communicate(timeout=1700)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Assert
    assert proc.returncode == 0, out[-4000:]
    assert "missing" not in out.split("== headline ratios")[1]
    res = {n: json.loads((tmp_path / f"{n}-quick.json").read_text()) for n in NAMES}
    comm = {r["variant"]: r for r in res["communication"]["results"]
            if r["model"].startswith("all-MiniLM")}
    assert comm["fp32 adapter"]["payload_bytes"] == 299_532  # as the runs measure
    assert comm["int8 delta"]["vs_fp32_adapter"] < 0.26
    dp = res["dp_overhead"]["results"]
    assert all(r["correct"] for r in dp if r["mode"] in ("hooks", "functorch"))
    assert all(not r["correct"] and "TypeError" in r["error"]
               for r in dp if r["mode"] == "ew")
    pu = res["privacy_utility"]["results"]
    assert len(pu) == 5  # the tuned non-private baseline + 2 epsilons x 2 settings
    assert {r["epsilon_target"] for r in pu} == {8.0, math.inf}
    for r in pu:
        assert 0 <= r["accuracy"] <= 1
        spent = r["epsilon_spent_max"]
        if math.isinf(r["epsilon_target"]):
            assert spent in (None, math.inf)
        else:
            assert spent <= r["epsilon_target"] + 1e-6
    assert res["privacy_utility"]["headline_federated_dp8_over_best_central_nonprivate"]
    assert res["privacy_utility"]["majority_class"]["macro_f1"] < 0.1
    scale = res["scale"]
    assert [r["clients"] for r in scale["results"]] == [10, 100, 1000]
    assert all(r["sampled_per_round"] == 10 for r in scale["results"])
    assert scale["memory_growth_largest_over_smallest"] < 1.5
    fw = res["framework_overhead"]["results"]
    assert {r["mode"] for r in fw} == {"sequential", "parallel"}
    assert all(r["median_ratio_after_round1"] > 0 for r in fw)
    cold, warm = res["deploy_overhead"]["deployed"]
    assert cold["median_overhead_s"] > warm["median_overhead_s"] > 0
    assert warm["model_loads"] == 1 and cold["model_loads"] == 2
