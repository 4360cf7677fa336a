"""The privacy ledger across two simulated runs, and a site whose budget is spent."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from fedtune.client.ledger import Budget, PrivacyLedger
from fedtune.client.site import site_data
from fedtune.common import config
from tests.conftest import tiny_config
from tests.integration import runner
from tests.integration.test_simulation import _rounds, _simulate

pytestmark = pytest.mark.integration


@pytest.mark.slow  # 1-2 minutes: out of the ~5-minute default suite
def test_budget_exhausted_site_declines_and_spending_accumulates(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare: site 0 already spent far past its budget on its data (an old run).
    ledger_dir = tmp_path / "ledger"
    raw = tiny_config(tiny_bert, *review_files,
                      privacy={"target_epsilon": 2.0, "ledger_dir": str(ledger_dir),
                               "budget_epsilon": 6.0},
                      federation={"num_rounds": 2, "min_train_nodes": 2})
    cfg = config.from_dict(raw)
    site0 = site_data(cfg, {"partition-id": 0, "num-partitions": 3})
    PrivacyLedger(ledger_dir, site0.fingerprint).charge(
        (0.6, 1.0, 40), Budget(), run="old", round_=1, message="old-1")
    # Execute: two runs on the same ledger.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, first_dir = _simulate(tmp_path / "a", raw)
    second, second_dir = _simulate(tmp_path / "b", raw)
    # Assert: site 0 declines every round, the others carry the rounds.
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    one, two = _rounds(first_dir)[1:], _rounds(second_dir)[1:]
    for row in one + two:
        assert row["clients_declined"] == 1 and row["clients_replied"] == 2
    assert "declined the round: its privacy budget is exhausted" in first.stderr
    # Record-level epsilon per run stays at the target; the ledger's keeps growing.
    run_eps = max(two[-1]["epsilon_by_node"].values())
    assert run_eps == pytest.approx(2.0, abs=0.01)
    total_one = max(one[-1]["epsilon_total_by_node"].values())
    total_two = max(two[-1]["epsilon_total_by_node"].values())
    assert total_one == pytest.approx(2.0, abs=0.01) and 2.0 < total_two <= 6.0
    shown = runner.run(["privacy", "show", "--ledger-dir", str(ledger_dir)])
    assert shown.returncode == 0, shown.stderr[-2000:]
    show = shown.stdout
    datasets = [line for line in show.splitlines() if line.startswith("dataset")]
    assert len(datasets) == 3 and sum("  2 runs  " in d for d in datasets) == 2
    assert "budget 6  remaining" in show
    # each run by Flower's id and the operator's name, its releases by kind, its
    # epsilon the run's target (what the round lines said)
    runs = re.findall(r"  run (\d+) run: epsilon (\d+\.\d+)  \((.*);", show)
    assert len(runs) == 4, show
    assert all(float(eps) == pytest.approx(2.0, abs=0.01) for _, eps, _ in runs)
    assert all("2 rounds" in kinds for _, _, kinds in runs)


def test_central_dp_reports_client_level_epsilon(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    raw = tiny_config(tiny_bert, *review_files,
                      privacy={"central_dp": True, "central_noise_multiplier": 2.0,
                               "central_clipping_norm": 0.5})
    proc, run_dir = _simulate(tmp_path, raw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _rounds(run_dir)[1:]
    assert 0 < one["client_epsilon"] < two["client_epsilon"] < math.inf
    assert 0 < two["epsilon_max"] <= 8.0 + 1e-6  # record-level, reported beside it
    assert "central DP: 3 updates clipped to 0.5" in proc.stderr


def test_audit_detects_memorisation_without_dp(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare: no DP, many local epochs on 20 records (+ 30 canaries): the tiny
    # model memorises.
    small = tmp_path / "small.jsonl"
    small.write_text("".join(review_files[0].read_text().splitlines(True)[:20]))
    raw = tiny_config(tiny_bert, small, review_files[1],
                      privacy={"enabled": False},
                      train={"local_epochs": 40, "learning_rate": 5e-2},
                      lora={"r": 16, "alpha": 32},
                      federation={"num_sites": 2, "min_train_nodes": 2,
                                  "num_rounds": 2})
    cfg_path = tmp_path / "audit.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    # Execute
    proc = runner.run(["audit", str(cfg_path), "--canaries", "30", "--out",
                       str(tmp_path / "audit")], timeout=600)
    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert result["auc_canaries"] > 0.7 and result["auc_records"] > 0.55
    assert result["empirical_epsilon_canaries"] > 0
    assert result["accountant_epsilon"] is None  # no DP: no finite promise
    assert "canaries   AUC" in proc.stdout


def test_dp_recipe_end_to_end_plans_charges_and_reports(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare: a head-only round then a LoRA round with its own share of epsilon,
    # the logit adjustment and class weights from a DP histogram, sqrt weighting
    ledger_dir = tmp_path / "ledger"
    raw = tiny_config(
        tiny_bert, *review_files,
        model={"head_init": "zero"},
        privacy={"target_epsilon": 4.0, "linear_probe_budget": 0.4,
                 "ledger_dir": str(ledger_dir), "count_noise_multiplier": 5.0},
        train={"linear_probe_rounds": 1, "linear_probe_epochs": 3,
               "linear_probe_learning_rate": 0.05, "logit_adjustment": 1.0,
               "class_weighting": "sqrt", "personalize_epochs": 2},
        federation={"weighting": "sqrt"})
    # Execute
    proc, run_dir = _simulate(tmp_path, raw)
    # Assert: the plan came before round 1 and was written down
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.index("privacy plan: epsilon 4") < proc.stderr.index(
        "round 1/2 |")
    plan = json.loads((run_dir / "plan.json").read_text())
    assert len(plan["sites"]) == 3 and plan["overall"] in (
        "expected to learn", "marginal", "will learn nothing")
    # every round: each site's sigma, q, steps, dims and rho; weights; classes
    one, two = _rounds(run_dir)[1:]
    for row in (one, two):
        assert len(row["dp_by_node"]) == 3 and row["rho_max"] > 0
        assert sum(row["weight_by_node"].values()) == pytest.approx(1.0)
        assert {"eval_f1_positive", "eval_precision_negative",
                "eval_recall_neutral", "eval_collapsed"} <= set(row)
    head_only = {v["dims"] for v in one["dp_by_node"].values()}
    with_lora = {v["dims"] for v in two["dp_by_node"].values()}
    assert head_only == {32 * 3 + 3} and min(with_lora) > 99  # LoRA joins round 2
    sigmas = [{round(v["sigma"], 6) for v in r["dp_by_node"].values()}
              for r in (one, two)]
    assert sigmas[0].isdisjoint(sigmas[1])  # the budget split: two noise levels
    # the histogram release is on the ledger, and the whole run spends epsilon 4
    for path in ledger_dir.glob("*.json"):
        entries = json.loads(path.read_text())["entries"]
        assert [(e["sigma"], e["sample_rate"], e["steps"]) for e in entries][0] == (
            5.0, 1.0, 1)
        # histogram, round 1, round 2, then the personalisation on top
        assert len(entries) == 4
        assert entries[-2]["epsilon_after"] == pytest.approx(4.0, abs=0.02)
        assert 4.0 < entries[-1]["epsilon_after"] <= 4.0 + 1.0 + 0.02
    # every epsilon the operator sees is the ledger's: the run's last line holds
    # each site's total after the personalisation too, and the report says so
    totals = [float(json.loads(p.read_text())["entries"][-1]["epsilon_after"])
              for p in ledger_dir.glob("*.json")]
    assert sorted(two["epsilon_total_by_node"].values()) == pytest.approx(
        sorted(totals))
    assert sorted(two["epsilon_by_node"].values()) == pytest.approx(sorted(totals))
    assert two["epsilon_max"] == pytest.approx(max(totals))
    assert two["epsilon_releases"] == ["personalisation", "round"]
    assert f"max ε {max(totals):.3f} (the personalisation + rounds" in proc.stdout
    # personalisation: every site scored the global and its own adapter on its own
    # held-out split, spent its personalize_epsilon, and kept the adapter at home
    personal = json.loads((run_dir / "personalization.json").read_text())
    assert personal["round"] == two["best_round"] and len(personal["sites"]) == 3
    for site in personal["sites"].values():
        assert set(site["global"]) == set(site["personalised"]) == {
            "eval-loss", "accuracy", "macro-f1"}
        assert 0.5 < site["epsilon"] <= 1.0 + 1e-6
        assert 4.0 < site["epsilon_run"] <= 5.0 + 0.02
    kept = sorted(p.parent.name for p in run_dir.glob(
        "sites/p*/personalised/adapter_model.safetensors"))
    assert kept == ["personalised"] * 3
    assert "personalisation (3 sites, local fine-tuning, ε 1 more each)" in proc.stdout
    predicted = runner.run(["predict", str(run_dir / "sites" / "p0" / "personalised"),
                            "--input", str(review_files[1]), "--quiet"])
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert len(predicted.stdout.splitlines()) == 40
