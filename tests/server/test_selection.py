"""Best-round selection and early stopping, on metrics lines alone (no model)."""

from __future__ import annotations

import pytest

from fedtune.common.errors import FedtuneError
from fedtune.server.runtime.selection import STOPPED, Selection


def _rows(values: list[float], key: str = "eval_macro_f1") -> list[dict]:
    return [{"round": i, key: v} for i, v in enumerate(values, 1)]


def test_best_round_follows_the_metric_direction() -> None:
    # Prepare
    f1 = Selection(metric="macro-f1")
    loss = Selection(metric="loss")
    # Execute
    for row in _rows([0.2, 0.5, 0.4]):
        f1.update(row["round"], row)
    for row in _rows([0.9, 0.7, 0.8], key="eval_loss"):
        loss.update(row["round"], row)
    # Assert
    assert (f1.best_round, f1.best_value, f1.stale) == (2, 0.5, 1)
    assert (loss.best_round, loss.best_value) == (2, 0.7)
    assert not f1.should_stop and not loss.should_stop  # no patience: never stops


def test_patience_and_min_delta_stop_the_run() -> None:
    # Prepare: gains of 0.005 do not count with min_delta 0.01
    sel = Selection(metric="macro-f1", patience=2, min_delta=0.01)
    # Execute
    stops = []
    for row in _rows([0.30, 0.50, 0.505, 0.509]):
        sel.update(row["round"], row)
        stops.append(sel.should_stop)
    # Assert
    assert stops == [False, False, False, True]
    assert sel.stopped_at == 4 and sel.best_round == 2
    fields = sel.fields()
    assert fields["best_round"] == 2 and fields["rounds_without_improvement"] == 2
    assert "best round 2" in fields[STOPPED] and "patience=2" in fields[STOPPED]


def test_round_zero_and_missing_metrics_are_no_candidates() -> None:
    # Prepare
    sel = Selection(metric="accuracy", patience=1)
    # Execute
    sel.update(0, {"eval_accuracy": 0.99})  # the adapter before training
    sel.update(1, {"eval_accuracy": float("nan")})
    # Assert: no best yet, so no early stop either
    assert sel.best_round == 0 and not sel.should_stop
    sel.update(2, {"eval_accuracy": 0.4})
    assert sel.best_round == 2


def test_replay_rebuilds_the_state_and_refuses_a_stopped_run() -> None:
    # Prepare
    rows = _rows([0.3, 0.6, 0.5, 0.4])
    stopped = [*rows[:-1], {**rows[-1], STOPPED: "no improvement"}]
    # Execute
    live = Selection(metric="macro-f1", patience=3)
    live.replay(rows)
    # Assert
    assert (live.best_round, live.stale, live.should_stop) == (2, 2, False)
    with pytest.raises(FedtuneError, match="stopped early after round 4.*"
                       "--past-early-stop"):
        Selection(metric="macro-f1", patience=2).replay(stopped)
    again = Selection(metric="macro-f1", patience=2)
    again.replay(stopped, past_stop=True)
    assert (again.best_round, again.stale, again.should_stop) == (2, 0, False)
