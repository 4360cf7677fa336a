"""The one privacy release API: check, charge once, report the ledger's epsilons."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.client.ledger import Budget, PrivacyLedger
from fedtune.client.releases import KINDS, SHARE, Book, Releases
from fedtune.common import records
from fedtune.common.accounting import epsilon_spent
from fedtune.common.config import PrivacyConfig
from fedtune.common.errors import PrivacyBudgetExhausted

ROUND = (1.1, 0.25, 8)
ONCE = (2.0, 1.0, 1)


def _releases(book: Book | None, history: list, *, message: str = "m1",
              run: str = "7", enabled: bool = True) -> Releases:
    return Releases(PrivacyConfig(enabled=enabled), history, book, run=run,
                    round_=1, message=message, run_name="icd10-run")


def test_every_kind_is_charged_once_and_the_epsilons_are_the_ledgers(
        tmp_path: Path) -> None:
    # Prepare: a ledger that already holds another run's round
    ledger = PrivacyLedger(tmp_path, "d" * 64)
    ledger.charge(ROUND, Budget(), run="old", round_=1, message="old")
    history: list = []
    rel = _releases(Book(ledger, Budget(epsilon=50.0)), history)
    # Execute: one release of each kind, the message delivered twice
    # (a noise share is a round's release under distributed noise: one message
    # makes one or the other, below)
    kinds = [k for k in KINDS if k != SHARE]
    for _ in range(2):
        for kind in kinds:
            rel.check(kind, ROUND if kind in ("round", "personalisation") else ONCE)
            rel.charge(kind, ROUND if kind in ("round", "personalisation") else ONCE)
    m = rel.metrics()
    # Assert: four entries of this run, each with its kind and the run's name;
    # this run's epsilon is its releases composed, the total the whole ledger's
    entries = [e for e in ledger.read()["entries"] if e["run"] == "7"]
    assert [e["kind"] for e in entries] == kinds
    assert {e["run_name"] for e in entries} == {"icd10-run"}
    mine = [ROUND, ONCE, ONCE, ROUND]
    assert len(history) == 8  # the run's state: the second delivery too
    assert m[records.EPSILON_TOTAL] == pytest.approx(ledger.spent(1e-5))
    assert m[records.EPSILON_TOTAL] == pytest.approx(
        epsilon_spent([ROUND, *mine], delta=1e-5))
    once = _releases(None, [])
    for kind, seg in zip(kinds, mine, strict=True):
        once.charge(kind, seg)
    assert once.metrics()[records.EPSILON] == pytest.approx(
        epsilon_spent(mine, delta=1e-5))
    assert once.metrics()[records.EPSILON_TOTAL] == once.metrics()[records.EPSILON]


def test_a_release_the_budget_cannot_afford_is_refused_before_anything(
        tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, "d" * 64)
    poor = _releases(Book(ledger, Budget(epsilon=0.5)), [])
    with pytest.raises(PrivacyBudgetExhausted, match="declines"):
        poor.check("calibration", ONCE, ROUND)
    assert not ledger.path.exists()
    # DP off under a budget: refused; DP off without one: nothing to charge
    off = _releases(Book(ledger, Budget(epsilon=8.0)), [], enabled=False)
    with pytest.raises(PrivacyBudgetExhausted, match="non-private personalisation"):
        off.check("personalisation", ROUND)
    free = _releases(Book(ledger, Budget()), [], enabled=False)
    free.check("round", ROUND)
    free.charge("round", ROUND)
    assert free.metrics() == {} and not ledger.path.exists()
    with pytest.raises(ValueError, match="unknown release kind"):
        free.check("share", ROUND)
    # a policy's noise floor sees the DP-SGD noise before anything is released
    seen: list = []
    watched = Releases(PrivacyConfig(), [], None, run="7", round_=1, message="m",
                       check_noise=seen.extend)
    watched.check("round", ROUND, noise=[1.1])
    assert seen == [1.1]


def test_a_noise_share_is_booked_as_its_rounds_one_release(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, "d" * 64)
    rel = _releases(Book(ledger, Budget(epsilon=50.0)), [])
    share = (4.0, 1.0, 1)  # one full-batch step
    for _ in range(2):  # the message delivered twice: booked once
        rel.check(SHARE, share)
        rel.charge(SHARE, share)
    (entry,) = ledger.read()["entries"]
    assert entry["kind"] == SHARE and entry["message"] == rel.message
    assert (entry["sigma"], entry["sample_rate"], entry["steps"]) == share
    assert rel.metrics()[records.EPSILON_TOTAL] == pytest.approx(
        epsilon_spent([share], delta=1e-5))
