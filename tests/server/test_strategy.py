from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedtune.common import records
from fedtune.common.config import FederationConfig
from fedtune.common.errors import ConfigError
from fedtune.server.runtime.registry import build_strategy
from fedtune.server.runtime.strategy import FedTuneAvg, FedTuneAvgM


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



@pytest.mark.parametrize(("weighting", "expected"), [
    ("examples", (10 * 1 + 90 * 4) / 100),
    ("sqrt", (np.sqrt(10) * 1 + np.sqrt(90) * 4) / (np.sqrt(10) + np.sqrt(90))),
    ("uniform", (1 + 4) / 2),
])
@pytest.mark.usefixtures("flower_identity")
def test_site_weighting_gives_small_sites_a_voice(weighting: str,
                                                  expected: float) -> None:
    # Prepare: a small site (10 records) and a large one (90)
    query = Message(RecordDict({records.CONFIG: ConfigRecord()}), dst_node_id=1,
                    message_type="train")
    replies = [_reply(query, {"head.bias": torch.tensor([v])}, n)
               for v, n in ((1.0, 10), (4.0, 90))]
    for node, reply in enumerate(replies, 1):
        reply.metadata.__dict__["_src_node_id"] = node  # two distinct sites
    strategy = build_strategy(FederationConfig(weighting=weighting),  # type: ignore
                              min_train_nodes=1, min_available_nodes=1)
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: the average and the weights the round records
    assert arrays is not None
    assert float(records.from_record(arrays)["head.bias"]) == pytest.approx(expected)
    shares = sorted(strategy.round_stats[1].summary()["weight_by_node"].values())
    small = {"examples": 0.1, "sqrt": np.sqrt(10) / (np.sqrt(10) + np.sqrt(90)),
             "uniform": 0.5}[weighting]
    assert shares[0] == pytest.approx(small)


@pytest.mark.usefixtures("flower_identity")
def test_fedavgm_momentum_accumulates_and_survives_a_resume() -> None:
    # Prepare: the global head at 0; every round a site moves it to 1
    fed = FederationConfig(strategy="fedavgm", server_learning_rate=1.0,
                           server_momentum=0.5)

    def round_of(strategy: FedTuneAvgM, rnd: int, current: float) -> float:
        arrays = records.to_record({"head.bias": torch.tensor([current])})
        strategy.configure_train(rnd, arrays, ConfigRecord(), _Grid())
        query = Message(RecordDict({records.CONFIG: ConfigRecord()}), dst_node_id=1,
                        message_type="train")
        out, _ = strategy.aggregate_train(rnd, [_reply(
            query, {"head.bias": torch.tensor([current + 1.0])}, 5)])
        assert out is not None
        return float(records.from_record(out)["head.bias"])

    first = build_strategy(fed, min_train_nodes=1, min_available_nodes=1)
    assert isinstance(first, FedTuneAvgM)
    # Execute: two rounds, then a fresh strategy restored from the state
    one = round_of(first, 1, 0.0)
    two = round_of(first, 2, one)
    resumed = build_strategy(fed, min_train_nodes=1, min_available_nodes=1)
    assert isinstance(resumed, FedTuneAvgM)
    resumed.restore(*first.state())
    # Assert: steps 1, then 1 + 0.5 * 1 (momentum), then 1 + 0.5 * 1.5
    assert one == pytest.approx(1.0) and two == pytest.approx(2.5)
    assert round_of(resumed, 3, two) == pytest.approx(2.5 + 1.75)


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam"])
def test_server_optimizers_step_a_head_only_round(strategy: str) -> None:
    # Prepare: a global adapter with frozen LoRA of several shapes; the site
    # sends the head alone (a head-only round), the server fills the LoRA in
    lora = {f"layer.{i}.q.lora_{ab}.weight": torch.full(shape, float(i))
            for i in range(4) for ab, shape in (("A", (8, 384)), ("B", (384, 8)))}
    head = {"head.weight": torch.zeros(3, 384), "head.bias": torch.zeros(3)}
    fed = FederationConfig(strategy=strategy, server_learning_rate=1.0)
    built = build_strategy(fed, min_train_nodes=1, min_available_nodes=1,
                           head_rounds=1)
    built.configure_train(1, records.to_record({**lora, **head}), ConfigRecord(),
                          _Grid())
    query = Message(RecordDict({records.CONFIG: ConfigRecord()}), dst_node_id=1,
                    message_type="train")
    # Execute
    out, _ = built.aggregate_train(1, [_reply(query, {
        "head.weight": torch.ones(3, 384), "head.bias": torch.ones(3)}, 5)])
    # Assert: the LoRA is as it was, the head moved
    assert out is not None
    got = records.from_record(out)
    for k, v in lora.items():
        assert torch.equal(got[k], v), k
    assert float(got["head.bias"][0]) > 0


class _Grid:
    """Just enough of Flower's Grid for configure_train (one node)."""

    def get_node_ids(self) -> list[int]:
        return [1]


@pytest.mark.usefixtures("flower_identity")
def test_sites_are_named_by_the_operators_label_else_their_own() -> None:
    # Prepare: node 1's reply carries its daemon's --label
    from fedtune.common.config import site_labels, site_labels_value

    query = Message(RecordDict({records.CONFIG: ConfigRecord()}), dst_node_id=1,
                    message_type="train")
    reply = _reply(query, {"head.bias": torch.tensor([1.0])}, 10, eps=1.0)
    reply.content[records.SITE] = ConfigRecord({records.SITE_LABEL: "own-name"})
    labels = {"1": "hospital-a", "7": "hospital-b"}
    assert site_labels(site_labels_value(labels)) == labels
    assert site_labels("") == {} and site_labels("x=,=y,1=a") == {"1": "a"}
    # Execute: with the operator's registered labels, then without
    named = build_strategy(FederationConfig(), min_train_nodes=1,
                           min_available_nodes=1)
    named.site_labels = labels
    named.aggregate_train(1, [reply])
    plain = build_strategy(FederationConfig(), min_train_nodes=1,
                           min_available_nodes=1)
    plain.aggregate_train(1, [reply])
    # Assert: the registration wins; the site's own label fills in for none
    assert named.round_stats[1].summary()["site_by_node"] == labels
    assert plain.round_stats[1].summary()["site_by_node"] == {"1": "own-name"}


@pytest.mark.usefixtures("flower_identity")
def test_a_configuration_error_reaches_the_operator_in_one_line_and_stops_the_run(
        ) -> None:
    # Prepare: a site's data does not hold the run's labels (a typo in data.labels)
    from fedtune.client.mods import failure_text
    from fedtune.common.data import label_ids
    from fedtune.common.errors import DataError, FedtuneError
    from fedtune.server.runtime import stats as round_stats

    rows = [{"y": "jane-doe"}, {"y": "neutral"}]
    with pytest.raises(DataError) as err:
        label_ids(rows, column="y", labels=["neutrl", "positive"])
    sent = failure_text(err.value)
    query = Message(RecordDict({records.CONFIG: ConfigRecord()}), dst_node_id=1,
                    message_type="train")
    failed = Message(Error(code=0, reason=f"<'{sent}'>"), reply_to=query)
    strategy = build_strategy(FederationConfig(), min_train_nodes=1,
                              min_available_nodes=1)
    strategy.site_labels = {"1": "hospital-a"}
    # Execute
    arrays, _ = strategy.aggregate_train(1, [failed])
    stopped = round_stats.config_failed(1, strategy.round_stats[1])
    # Assert: the one line names the column and the declared labels, never a value
    # from the data; the run stops at once (no retry, no promised resume)
    assert arrays is None
    why = strategy.round_stats[1].config_failures["1"]
    assert why.startswith("DataError: the site's column 'y' holds 2 label(s) that "
                          "data.labels=['neutrl', 'positive'] does not declare")
    assert "jane-doe" not in sent and "neutral" not in sent.replace("neutrl", "")
    assert isinstance(stopped, FedtuneError)
    assert str(stopped).startswith("round 1: hospital-a: DataError: the site's")
    assert "start a new run" in str(stopped) and "resuming" in str(stopped)
    # an error without public words: its class only, and retried like any failure
    assert failure_text(DataError("/secret/path.jsonl: x")) == (
        "DataError on the site (details stay in the site's own log)")
