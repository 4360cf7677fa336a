from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedtune.common import records
from fedtune.common.config import FederationConfig
from fedtune.common.errors import ConfigError
from fedtune.server.strategy import FedTuneAvg, build_strategy


def _reply(query: Message, state: dict[str, torch.Tensor], n: int,
           eps: float | None = None) -> Message:
    metrics = {records.NUM_EXAMPLES: n, records.TRAIN_LOSS: float(n),
               records.TRAIN_SECONDS: 1.5}
    if eps is not None:
        metrics[records.EPSILON] = eps
    return Message(RecordDict({records.ARRAYS: records.to_record(state),
                               records.METRICS: MetricRecord(metrics)}),
                   reply_to=query)


@pytest.mark.usefixtures("flower_identity")
def test_fedavg_weights_adapter_tensors_by_num_examples() -> None:
    # Prepare: three sites with hand-checkable tensors
    query = Message(RecordDict({records.CONFIG: ConfigRecord()}), dst_node_id=1,
                    message_type="train")
    states = [{"l.lora_A.weight": torch.full((2, 3), v), "head.bias": torch.tensor([v])}
              for v in (1.0, 2.0, 4.0)]
    weights = [10, 30, 60]
    replies = [_reply(query, s, n, eps) for s, n, eps in
               zip(states, weights, (1.0, 2.0, 3.0), strict=True)]
    failed = Message(Error(code=0, reason="site crashed"), reply_to=query)
    strategy = build_strategy(FederationConfig(), min_train_nodes=1,
                              min_available_nodes=1)
    # Execute
    arrays, metrics = strategy.aggregate_train(1, [*replies, failed])
    # Assert: (10*1 + 30*2 + 60*4) / 100 = 3.1
    assert arrays is not None and metrics is not None
    agg = records.from_record(arrays)
    assert torch.allclose(agg["l.lora_A.weight"], torch.full((2, 3), 3.1))
    assert torch.allclose(agg["head.bias"], torch.tensor([3.1]))
    assert metrics[records.TRAIN_LOSS] == pytest.approx((100 + 900 + 3600) / 100)
    stats = strategy.round_stats[1].summary()
    assert stats["clients_replied"] == 3 and stats["clients_failed"] == 1
    assert stats["epsilon_max"] == 3.0 and stats["epsilon_mean"] == 2.0
    assert stats["adapter_payload_bytes"] == 7 * 4
    assert stats["bytes_received"] == 3 * records.wire_bytes(replies[0].content[
        records.ARRAYS])
    assert stats["client_train_seconds_sum"] == 4.5
    assert strategy.train_metrics[1][records.TRAIN_LOSS] == pytest.approx(46.0)


@pytest.mark.usefixtures("flower_identity")
def test_non_private_replies_are_counted() -> None:
    query = Message(RecordDict({records.CONFIG: ConfigRecord()}), dst_node_id=1,
                    message_type="train")
    strategy = FedTuneAvg(min_train_nodes=1, min_available_nodes=1)
    strategy.aggregate_train(2, [_reply(query, {"w": torch.zeros(1)}, 5)])
    stats = strategy.round_stats[2].summary()
    assert stats["clients_non_private"] == 1 and stats["epsilon_max"] is None


def test_unknown_strategy() -> None:
    with pytest.raises(ConfigError, match="federation.strategy: .*'fedsgd'"):
        FederationConfig(strategy="fedsgd")  # type: ignore[arg-type]

