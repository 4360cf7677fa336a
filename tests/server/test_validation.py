"""Bad updates are rejected with a reason; the round aggregates the good ones."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedtune.common import records
from fedtune.common.config import FederationConfig
from fedtune.server.runtime import validation
from fedtune.server.runtime.registry import build_strategy
from tests.server.test_strategy import _reply

GLOBAL = {"a": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}
KEYS = frozenset({records.NUM_EXAMPLES, records.TRAIN_LOSS})


@pytest.mark.parametrize(("update", "match"), [
    ({"a": np.zeros((2, 2), np.float32)}, r"missing \['b'\]"),
    ({**GLOBAL, "c": np.zeros(1, np.float32)}, r"extra \['c'\]"),
    ({**GLOBAL, "a": np.zeros((2, 3), np.float32)}, r"float32\[2, 3\] where"),
    ({**GLOBAL, "a": np.zeros((2, 2), np.float64)}, r"float64\[2, 2\] where"),
    ({**GLOBAL, "b": np.array([0, np.nan, 0], np.float32)}, "NaN or Inf"),
    ({**GLOBAL, "b": np.array([0, np.inf, 0], np.float32)}, "NaN or Inf"),
    ({**GLOBAL, "b": np.array([3, 4, 0], np.float32)}, "update norm 5 exceeds"),
])
def test_bad_arrays_are_named(update: dict, match: str) -> None:
    reason = validation.check_arrays(update, GLOBAL, max_norm=1.0)
    assert reason is not None and re.search(match, reason), reason


def test_good_arrays_and_metrics_pass() -> None:
    ok = {**GLOBAL, "b": np.array([0.3, 0.4, 0], np.float32)}
    assert validation.check_arrays(ok, GLOBAL, max_norm=1.0) is None
    assert validation.check_arrays(ok, GLOBAL) is None  # no bound
    assert validation.check_metrics({records.NUM_EXAMPLES: 3, records.TRAIN_LOSS: 1.0},
                                    KEYS) is None


@pytest.mark.parametrize(("metrics", "match"), [
    ({records.TRAIN_LOSS: 1.0}, "lack a positive"),
    ({records.NUM_EXAMPLES: 0, records.TRAIN_LOSS: 1.0}, "lack a positive"),
    ({records.NUM_EXAMPLES: float("nan"), records.TRAIN_LOSS: 1.0}, "lack a positive"),
    ({records.NUM_EXAMPLES: 3, records.TRAIN_LOSS: 1.0, "x": 1}, "differ from"),
])
def test_bad_metrics_are_named(metrics: dict, match: str) -> None:
    assert match in (validation.check_metrics(metrics, KEYS) or "")


def test_usual_keys_is_the_majority() -> None:
    sets = [KEYS, KEYS | {"x"}, KEYS]
    assert validation.usual_keys(sets) == KEYS


@pytest.mark.usefixtures("flower_identity")
def test_one_bad_reply_never_ends_the_round(caplog: pytest.LogCaptureFixture
                                            ) -> None:
    # Prepare: global zeros; two good sites, then NaN, wrong shape, huge norm,
    # missing num-examples and an extra metric.
    query = Message(RecordDict({records.CONFIG: ConfigRecord()}), dst_node_id=1,
                    message_type="train")
    strategy = build_strategy(FederationConfig(max_update_norm=10.0),
                              min_train_nodes=1, min_available_nodes=1)
    strategy.expected.current = {"w": np.zeros(2, np.float32)}
    good = [_reply(query, {"w": torch.tensor([1.0, 1.0])}, 10),
            _reply(query, {"w": torch.tensor([3.0, 3.0])}, 30)]
    bad = [_reply(query, {"w": torch.tensor([float("nan"), 0.0])}, 10),
           _reply(query, {"w": torch.zeros(3)}, 10),
           _reply(query, {"w": torch.tensor([100.0, 0.0])}, 10),
           Message(RecordDict({records.ARRAYS: records.to_record(
               {"w": torch.ones(2)}), records.METRICS: MetricRecord(
               {records.TRAIN_LOSS: 1.0})}), reply_to=query),
           _reply(query, {"w": torch.ones(2)}, 10, eps=1.0)]
    # Execute
    arrays, _ = strategy.aggregate_train(1, [*good, *bad])
    # Assert: (10*1 + 30*3) / 40 = 2.5, the five bad ones rejected with reasons
    assert arrays is not None
    assert torch.allclose(records.from_record(arrays)["w"], torch.full((2,), 2.5))
    stats = strategy.round_stats[1]
    assert stats.replied == 2 and len(stats.nodes_rejected) >= 1
    reasons = [r.getMessage() for r in caplog.records
               if "rejected the update of node" in r.getMessage()]
    assert len(reasons) == 5
    for text in ("NaN or Inf", "float32[3] where", "update norm 100 exceeds",
                 "lack a positive", "differ from"):
        assert any(text in r for r in reasons), text
    assert stats.summary()["clients_rejected"] == len(stats.nodes_rejected)
