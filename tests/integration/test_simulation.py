"""Whole simulations through Flower's simulation engine, started as the CLI is."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_reviews, tiny_config, write_jsonl
from tests.integration import browser, runner

pytestmark = pytest.mark.integration


def _simulate(tmp_path: Path, raw: dict, *overrides: str, timeout: int = 420
              ) -> tuple[subprocess.CompletedProcess[str], Path]:
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    proc = runner.run(["simulate", str(cfg_path), *overrides, "--run-dir",
                       str(run_dir)], timeout=timeout)
    return proc, run_dir


def _rounds(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# DP off: tests/integration/test_after_run.py's shared run is a DP-off simulation
@pytest.mark.parametrize("dp", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["dp-on", "dp-off"])
def test_three_sites_two_rounds(tmp_path: Path, tiny_bert: Path,
                                review_files: tuple[Path, Path], dp: bool) -> None:
    # Prepare
    raw = tiny_config(tiny_bert, *review_files, privacy={"enabled": dp},
                      federation={"fraction_evaluate": 1.0 if dp else 0.0})
    # Execute
    proc, run_dir = _simulate(tmp_path, raw)
    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rounds(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients_replied"] == 3 and r["clients_failed"] == 0
        assert r["bytes_received"] > r["adapter_payload_bytes"] > 0
        assert {"eval_loss", "eval_accuracy", "eval_macro_f1", "train_loss",
                "round_seconds"} <= set(r)
        ckpt = run_dir / "checkpoints" / f"round-{r['round']:04d}"
        assert (ckpt / "adapter_model.safetensors").is_file()
        assert (ckpt / "adapter_config.json").is_file()
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["privacy"][
        "enabled"] is dp
    # the operator's report is written at the end, and TensorBoard events beside
    assert f"report: {run_dir / 'report' / 'index.html'}" in proc.stdout
    assert {p.name for p in (run_dir / "report").iterdir()} == {
        "index.html", "quality.png", "privacy.png", "communication.png",
        "timing.png", "participation.png"}
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    if dp:
        assert 0 < rows[1]["epsilon_max"] < rows[2]["epsilon_max"] <= 8.0 + 1e-6
        assert {"eval-loss", "accuracy", "macro-f1"} <= set(rows[2]["federated_eval"])
        images = browser.loaded_images(run_dir / "report" / "index.html", tmp_path)
        assert len(images) == 5 and all(w > 0 and h > 0 for w, h, _ in images)
    else:
        assert rows[2]["epsilon_max"] is None and rows[2]["clients_non_private"] == 3
        assert "DP is OFF" in proc.stderr


def test_head_then_top_layer_lora(tmp_path: Path, tiny_bert: Path,
                                  review_files: tuple[Path, Path]) -> None:
    # Prepare: round 1 trains the head, round 2 LoRA on the top layer only
    raw = tiny_config(tiny_bert, *review_files, lora={"top_layers": 1},
                      train={"linear_probe_rounds": 1},
                      federation={"num_sites": 2, "min_train_nodes": 2})
    # Execute
    proc, run_dir = _simulate(tmp_path, raw)
    # Assert: the sites trained and sent LoRA of the top layer, the server scored it
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rounds(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["clients_replied"] == 2 and "eval_macro_f1" in rows[2]
    assert rows[2]["adapter_payload_bytes"] > rows[1]["adapter_payload_bytes"]
    from safetensors.torch import load_file

    from fedtune.common.adapters import is_adapter
    from fedtune.common.toplayers import layer_of

    final = load_file(run_dir / "final" / "adapter_model.safetensors")
    lora = [k for k in final if is_adapter(k)]
    assert lora and {layer_of(k) for k in lora} == {1}
    assert any(float(final[k].abs().max()) > 0 for k in lora if "lora_B" in k)
    (tmp_path / "texts.txt").write_text("good great relief\n")
    proc = runner.run(["predict", str(run_dir), "--input",
                       str(tmp_path / "texts.txt"), "--quiet"])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_causal_lm_simulation(tmp_path: Path, tiny_llama: Path, sft_file: Path
                              ) -> None:
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": f"the drug was {w} for weeks"})
                               + "\n" for w in ("good", "bad", "okay", "great")))
    raw = tiny_config(tiny_llama, sft_file, sft_file,
                      model={"task": "causal-lm"},
                      data={"max_length": 24, "val_fraction": 0.0,
                            "retention_source": str(general),
                            "answer_pattern": "review is (?P<rating>[a-z]+)"},
                      federation={"num_sites": 2, "min_train_nodes": 2,
                                  "num_rounds": 1})
    proc, run_dir = _simulate(tmp_path, raw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, last = _rounds(run_dir)
    assert last["eval_perplexity"] > 1.0 and last["epsilon_max"] > 0
    # the forgetting check: general text scored before training and every round
    assert first["retention_perplexity"] > 1.0 and last["retention_perplexity"] > 1.0
    # and by what it answers: greedy answers scored before training and after
    for row in (first, last):
        assert 0.0 <= row["eval_answer_exact"] <= row["eval_answer_rating"] <= 1.0
    assert "answers exact " in proc.stderr
    proc = runner.run(["report", str(run_dir)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "perplexity" in proc.stdout and "1 of 1 done" in proc.stdout
    assert "exact " in proc.stdout and "rating " in proc.stdout  # the rounds table
    assert f"retention (general text, {general}): perplexity " in proc.stdout
    assert last["best_round"] == 1 and last["selection_metric"] == "loss"
    # the merged export is a plain AutoModelForCausalLM equal to base + adapter
    import torch
    from transformers import AutoModelForCausalLM

    from fedtune.server.runtime.trained import load_model, resolve

    proc = runner.run(["export", str(run_dir), "--merge", "--out",
                       str(tmp_path / "merged")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        ref = load_model(resolve(run_dir))(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, ref, atol=1e-4)
    (tmp_path / "prompts.txt").write_text("review : good great ?\n")
    proc = runner.run(["predict", str(tmp_path / "merged"), "--input",
                       str(tmp_path / "prompts.txt"), "--quiet"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert isinstance(json.loads(proc.stdout)["response"], str)


def test_embedded_default_model_and_data(tmp_path: Path) -> None:
    """The README's main job, shrunk: real MiniLM + ICD-10 hospitals, DP on (the
    default's 10 head-only rounds become the run's 1)."""
    from fedtune.common.cliargs import default_scenario

    raw = yaml.safe_load(default_scenario().read_text())
    proc, run_dir = _simulate(
        tmp_path, raw, "federation.num-rounds=1", "federation.num-sites=2",
        "federation.min-train-nodes=2", "data.max-samples-per-site=24",
        "data.max-test-samples=48", "train.local-epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    zero, last = _rounds(run_dir)[0], _rounds(run_dir)[-1]
    # round 0 is the zero-shot model: the head from the chapters' titles, before
    # any record is read (0.358 on the default's 2,000 held-out records)
    assert zero["head_init"] == "labels" and zero["head_init_from"] == "descriptions"
    assert zero["head_init_scale"] == 60.0  # the map's smallest size: 21 records
    assert zero["eval_macro_f1"] > 0.2 and "epsilon_max" not in zero
    assert "zero-shot (round 0: the head from the label descriptions' " in proc.stdout
    # a head-only round exchanges the 21-class head only (the frozen LoRA r=8 q/v,
    # 327,252 bytes with it, stays where it is)
    assert last["adapter_payload_bytes"] == (384 * 21 + 21) * 4 == 32_340
    assert 0 < last["epsilon_max"] <= 8.0 + 1e-6
    assert {v["dims"] for v in last["dp_by_node"].values()} == {384 * 21 + 21}
    # the decision calibration: chosen on the sites' validation counts, recorded
    # on the round's line and in the adapter, inside the same epsilon
    cal = last["calibration"]
    assert cal["sites"] == 2 and len(cal["candidates"]) == 5
    assert cal["strength"] in [c["strength"] for c in cal["candidates"]]
    assert {"accuracy", "macro-f1"} <= set(cal["eval"])
    meta = json.loads((run_dir / "final" / "fedtune_model.json").read_text())
    assert meta["decision_bias"] == cal["decision_bias"] and len(
        meta["decision_bias"]) == 21


@pytest.mark.slow  # 1-2 minutes: out of the ~5-minute default suite
def test_partial_participation_dirichlet_and_early_stopping(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    raw = tiny_config(tiny_bert, *review_files,
                      data={"partition": "dirichlet", "dirichlet_alpha": 1.0},
                      train={"local_epochs": 3, "early_stopping_patience": 1},
                      federation={"num_sites": 4, "min_train_nodes": 2,
                                  "fraction_train": 0.5, "num_rounds": 2})
    proc, run_dir = _simulate(tmp_path, raw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rounds(run_dir)[1:]
    assert [r["clients_sampled"] for r in rows] == [2, 2]
    assert all(r["clients_replied"] == 2 for r in rows)
    # every site within its budget; one that trained in both rounds spent more in
    # the second (a site sampled only in round 2 may have spent less than round
    # 1's: sites differ in size, hence in sample rate and noise)
    eps1, eps2 = rows[0]["epsilon_by_node"], rows[1]["epsilon_by_node"]
    assert all(0 < e <= 8.0 + 1e-6 for e in [*eps1.values(), *eps2.values()])
    assert all(eps2[n] > eps1[n] for n in eps1.keys() & eps2.keys())


def test_a_hundred_site_console_stays_short(tmp_path: Path, tiny_bert: Path,
                                            review_files: tuple[Path, Path]) -> None:
    # Prepare: 100 sites of 30 records, 5 sampled a round, 2 rounds, DP on
    train = write_jsonl(tmp_path / "train.jsonl", make_reviews(3000, 7))
    raw = tiny_config(tiny_bert, train, review_files[1],
                      federation={"num_sites": 100, "fraction_train": 0.05,
                                  "min_train_nodes": 0})
    # Execute
    proc, run_dir = _simulate(tmp_path, raw)
    # Assert: the plan as a summary, a line a round, the summary: <= 60 lines
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = (proc.stdout + proc.stderr).splitlines()
    print("\n".join(shown))
    assert len(shown) <= 60, len(shown)
    text = "\n".join(shown)
    assert "100 sites, grouped by verdict" in text
    assert sum(" | train loss " in x for x in shown) == 2
    assert "ClientAppActor" not in text and "configure_train" not in text
    assert not re.search(r"node \d{6,}", text)  # no raw node ids
    logs = run_dir / "logs"
    assert f"logs (what the terminal did not show): {logs / 'run.log'}" in text
    # ... and the run directory keeps what the terminal no longer shows
    run_log = (logs / "run.log").read_text()
    assert "configure_train: Sampled 5 nodes (out of 100)" in run_log
    by_site = [x for x in run_log.splitlines() if "epsilon by site: " in x]
    assert len(by_site) == 2 and re.search(r"by site: p\d+=", by_site[0])
    assert "ClientAppActor" in (logs / "sites.log").read_text()
    assert len(json.loads((run_dir / "plan.json").read_text())["sites"]) == 100
    assert "sites.log" in (run_dir / "report" / "index.html").read_text()
