"""The on-disk privacy ledger: durable, exact, locked, and never silently reset."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedtune.client.ledger import Budget, PrivacyLedger, fingerprint, summarize
from fedtune.common.accounting import epsilon_spent
from fedtune.common.errors import PrivacyBudgetExhausted, PrivacyError

SEG = (1.1, 0.25, 8)  # (noise multiplier, sample rate, steps) of one local round
OPEN = Budget()


def _charge(args: tuple[str, int, int]) -> None:
    directory, worker, n = args
    ledger = PrivacyLedger(Path(directory), "ds")
    for i in range(n):
        ledger.charge(SEG, OPEN, run=f"run-{worker}", round_=i, message=f"{worker}-{i}")


def test_spending_survives_a_restart_and_matches_one_opacus_run(tmp_path: Path
                                                                ) -> None:
    # Prepare / Execute: three rounds by one "process", read back by a new one.
    first = PrivacyLedger(tmp_path, "ds", records=100)
    for rnd in range(1, 4):
        first.charge(SEG, OPEN, run="a", round_=rnd, message=f"m{rnd}")
    reopened = PrivacyLedger(tmp_path, "ds")
    # Assert: equals Opacus' accountant stepped 3 * 8 times in one process.
    reference = RDPAccountant()
    for _ in range(3 * SEG[2]):
        reference.step(noise_multiplier=SEG[0], sample_rate=SEG[1])
    assert reopened.spent(1e-5) == pytest.approx(reference.get_epsilon(delta=1e-5),
                                                 rel=1e-9)
    assert len(reopened.read()["entries"]) == 3


def test_a_second_run_keeps_accumulating(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, "ds")
    one = ledger.charge(SEG, OPEN, run="a", round_=1, message="a1")
    two = ledger.charge(SEG, OPEN, run="b", round_=1, message="b1")
    assert two > one > 0
    assert len(summarize(tmp_path)[0]["runs"]) == 2


def test_the_summary_lists_each_run_with_its_releases_and_epsilon(
        tmp_path: Path) -> None:
    # Prepare: run a (named) with a histogram and two rounds; run b with one round
    # and a calibration; an old entry without a kind (from its message's suffix)
    ledger = PrivacyLedger(tmp_path, "ds")
    cal = (2.0, 1.0, 1)
    ledger.charge(cal, OPEN, run="a", round_=1, message="a1/histogram",
                  kind="histogram", run_name="icd10-a")
    ledger.charge(SEG, OPEN, run="a", round_=1, message="a1", run_name="icd10-a")
    ledger.charge(SEG, OPEN, run="a", round_=2, message="a2", run_name="icd10-a")
    ledger.charge(SEG, OPEN, run="b", round_=1, message="b1")
    doc = ledger.read()
    doc["entries"].append({**doc["entries"][-1], "message": "b2/calibration",
                           "sigma": 2.0, "sample_rate": 1.0, "steps": 1})
    del doc["entries"][-1]["kind"]
    ledger._write(doc)
    # Execute
    (row,) = summarize(tmp_path)
    # Assert: each run's epsilon is its own releases composed; the total all of them
    a, b = row["runs"]
    assert (a["run"], a["name"], a["releases"]) == (
        "a", "icd10-a", {"histogram": 1, "round": 2})
    assert b["releases"] == {"round": 1, "calibration": 1}
    assert a["epsilon"] == pytest.approx(epsilon_spent([cal, SEG, SEG], delta=1e-5))
    assert b["epsilon"] == pytest.approx(epsilon_spent([SEG, cal], delta=1e-5))
    assert row["epsilon"] == pytest.approx(
        epsilon_spent([cal, SEG, SEG, SEG, cal], delta=1e-5))
    assert row["releases"] == 5


def test_a_retried_message_is_charged_once(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, "ds")
    eps = ledger.charge(SEG, OPEN, run="a", round_=1, message="same")
    assert ledger.charge(SEG, OPEN, run="a", round_=1, message="same") == eps
    assert len(ledger.read()["entries"]) == 1


def test_concurrent_runs_lose_no_update(tmp_path: Path) -> None:
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_charge, [(str(tmp_path), w, 10) for w in range(4)])
    entries = PrivacyLedger(tmp_path, "ds").read()["entries"]
    assert len(entries) == 40
    assert len({e["message"] for e in entries}) == 40


def test_budget_is_enforced_before_and_at_charge(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, "ds")
    one = ledger.charge(SEG, OPEN, run="a", round_=1, message="a1")
    tight = Budget(epsilon=one * 1.05, delta=1e-5)
    with pytest.raises(PrivacyBudgetExhausted, match="declines the round"):
        ledger.check(SEG, tight)
    with pytest.raises(PrivacyBudgetExhausted):
        ledger.charge(SEG, tight, run="a", round_=2, message="a2")
    assert len(ledger.read()["entries"]) == 1  # nothing charged past the budget
    row = summarize(tmp_path)[0]
    assert row["budget"] is None and row["epsilon"] == pytest.approx(one)


def test_a_corrupt_ledger_is_reported_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text('{"format": "fedtune-privacy-ledger/1", "entries": [{"sigma":')
    before = path.read_bytes()
    ledger = PrivacyLedger(tmp_path, "ds")
    with pytest.raises(PrivacyError, match="unreadable or corrupt .* left untouched"):
        ledger.charge(SEG, OPEN, run="a", round_=1, message="m")
    with pytest.raises(PrivacyError, match="corrupt"):
        ledger.spent(1e-5)
    assert path.read_bytes() == before
    path.write_text(json.dumps({"format": "something-else", "entries": []}))
    with pytest.raises(PrivacyError, match="not a fedtune-privacy-ledger/1"):
        ledger.read()


def test_budget_and_fingerprint_inputs() -> None:
    with pytest.raises(PrivacyError, match="epsilon > 0"):
        Budget(epsilon=0.0)
    assert math.isinf(Budget().epsilon)
    a = fingerprint([{"x": 1, "y": "é"}])
    assert a == fingerprint([{"y": "é", "x": 1}]) != fingerprint([{"x": 2, "y": "é"}])
