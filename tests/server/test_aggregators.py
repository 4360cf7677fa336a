"""Every strategy's aggregation against hand-computed values, on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedtune.common import records
from fedtune.common.config import FederationConfig
from fedtune.server.runtime.registry import build_strategy
from fedtune.server.runtime.strategy import FedTuneStrategy
from tests.server.test_strategy import _reply

QUERY_KW = {"dst_node_id": 1, "message_type": "train"}


class FakeGrid:
    """Just enough of a Grid for ``configure_train``."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _strategy(**fed: object) -> FedTuneStrategy:
    return build_strategy(FederationConfig(num_sites=8, min_train_nodes=1, **fed),
                          min_train_nodes=1, min_available_nodes=1)


def _aggregate(strategy: FedTuneStrategy, values: list[list[float]],
               weights: list[int] | None = None) -> np.ndarray:
    query = Message(RecordDict({records.CONFIG: ConfigRecord()}), **QUERY_KW)
    weights = weights or [1] * len(values)
    replies = [_reply(query, {"w": torch.tensor(v)}, n)
               for v, n in zip(values, weights, strict=True)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return records.from_record(arrays)["w"].numpy()


@pytest.mark.usefixtures("flower_identity")
def test_median_is_coordinate_wise() -> None:
    got = _aggregate(_strategy(strategy="median"),
                     [[1.0, 30.0], [2.0, -5.0], [10.0, 7.0]])
    assert np.array_equal(got, np.array([2.0, 7.0], np.float32))


@pytest.mark.usefixtures("flower_identity")
def test_trimmed_mean_cuts_the_extremes() -> None:
    # 5 values, 20 % cut at each end: one on each side
    got = _aggregate(_strategy(strategy="trimmed-mean", trim_fraction=0.2),
                     [[1.0], [2.0], [3.0], [4.0], [100.0]])
    assert got == pytest.approx([3.0])


@pytest.mark.usefixtures("flower_identity")
def test_krum_and_multi_krum_select_by_neighbour_distance() -> None:
    # Scores with f=1 (n-f-2 = 2 nearest): 0 -> .0725, .1 -> .0325,
    # .25 -> .025, .3 -> .0425, 100 -> huge
    values = [[0.0], [0.1], [0.25], [0.3], [100.0]]
    krum = _aggregate(_strategy(strategy="krum", krum_malicious=1), values)
    multi = _aggregate(_strategy(strategy="multi-krum", krum_malicious=1), values)
    assert krum == pytest.approx([0.25])
    assert multi == pytest.approx([(0.0 + 0.1 + 0.25 + 0.3) / 4])


@pytest.mark.usefixtures("flower_identity")
def test_fedavg_is_weighted_and_fedadam_takes_one_adam_step() -> None:
    avg = _aggregate(_strategy(), [[1.0], [4.0]], [1, 2])
    assert avg == pytest.approx([3.0])
    # FedAdam from x = 0 with the average delta d = 3 (round 1)
    adam = _strategy(strategy="fedadam", server_learning_rate=0.1,
                     server_beta_1=0.9, server_beta_2=0.99, server_tau=1e-3)
    adam.current_arrays = {"w": np.zeros(1, np.float32)}  # type: ignore[attr-defined]
    adam.expected.current = {"w": np.zeros(1, np.float32)}
    got = _aggregate(adam, [[1.0], [4.0]], [1, 2])
    assert got.dtype == np.float32  # Flower's step is float64; the adapter is not
    m, v = 0.1 * 3.0, 0.01 * 9.0
    eta = 0.1 * math.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)
    assert got == pytest.approx([eta * m / (math.sqrt(v) + 1e-3)], rel=1e-5)
    # the moments survive a resume
    arrays, scalars = adam.state()
    again = _strategy(strategy="fedadam")
    again.restore(arrays, scalars)
    assert np.array_equal(again.m_t["w"], adam.m_t["w"])  # type: ignore[attr-defined]
    assert np.array_equal(again.v_t["w"], adam.v_t["w"])  # type: ignore[attr-defined]


@pytest.mark.usefixtures("flower_identity")
def test_ffa_lora_aggregation_is_exact_and_plain_lora_is_not() -> None:
    # Prepare: a shared frozen A; two sites' B
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 6)).astype(np.float32)
    bs = [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(2)]
    a_sites = [a + rng.normal(size=a.shape).astype(np.float32) for _ in range(2)]
    # Execute: FFA sends only B; plain LoRA sends A and B
    b_avg = _aggregate_arrays(_strategy(), [{"l.lora_B.weight": b} for b in bs])
    plain = _aggregate_arrays(_strategy(), [
        {"l.lora_A.weight": ai, "l.lora_B.weight": b}
        for ai, b in zip(a_sites, bs, strict=True)])
    # Assert: mean of the products == product of the means for FFA only
    products = np.mean([b @ a for b in bs], axis=0)
    assert np.allclose(b_avg["l.lora_B.weight"] @ a, products, atol=1e-5)
    plain_products = np.mean([b @ ai for ai, b in zip(a_sites, bs, strict=True)],
                             axis=0)
    assert not np.allclose(plain["l.lora_B.weight"] @ plain["l.lora_A.weight"],
                           plain_products, atol=1e-2)


def _aggregate_arrays(strategy: FedTuneStrategy, states: list[dict[str, np.ndarray]]
                      ) -> dict[str, np.ndarray]:
    query = Message(RecordDict({records.CONFIG: ConfigRecord()}), **QUERY_KW)
    replies = [_reply(query, {k: torch.from_numpy(v) for k, v in s.items()}, 1)
               for s in states]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return {k: v.numpy() for k, v in records.from_record(arrays).items()}


@pytest.mark.usefixtures("flower_identity")
def test_heterogeneous_ranks_round_trip_through_the_strategy() -> None:
    # Prepare: a rank-4 global; node 7 trains rank 2, node 8 rank 4
    rng = np.random.default_rng(1)
    glob = {"l.lora_A.weight": rng.normal(size=(4, 6)).astype(np.float32),
            "l.lora_B.weight": np.zeros((5, 4), np.float32)}
    strategy = build_strategy(FederationConfig(num_sites=8, min_train_nodes=2),
                              lower_ranks=True, min_train_nodes=2,
                              min_available_nodes=2)
    record = ArrayRecord({k: Array(v) for k, v in glob.items()})
    strategy.configure_train(1, record, ConfigRecord(), FakeGrid([7, 8]))
    small = {"l.lora_A.weight": glob["l.lora_A.weight"][:2] + 1,
             "l.lora_B.weight": np.ones((5, 2), np.float32)}
    full = {"l.lora_A.weight": glob["l.lora_A.weight"] + 1,
            "l.lora_B.weight": np.ones((5, 4), np.float32)}
    replies = []
    for node, state in ((7, small), (8, full)):
        query = Message(RecordDict({records.CONFIG: ConfigRecord()}),
                        dst_node_id=node, message_type="train")
        reply = _reply(query, {k: torch.from_numpy(v) for k, v in state.items()}, 1)
        replies.append(reply)
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    messages = list(strategy.configure_train(2, arrays, ConfigRecord(),
                                             FakeGrid([7, 8])))
    # Assert: ranks 0-1 averaged over both, ranks 2-3 moved by node 8 only
    agg = records.from_record(arrays)
    assert torch.allclose(agg["l.lora_B.weight"][:, :2], torch.ones(5, 2))
    assert torch.allclose(agg["l.lora_B.weight"][:, 2:], torch.full((5, 2), 0.5))
    assert strategy.expected.node_ranks == {7: 2}
    shapes = {m.metadata.dst_node_id: m.content[records.ARRAYS][
        "l.lora_A.weight"].shape for m in messages}
    assert shapes == {7: (2, 6), 8: (4, 6)}
    assert strategy.round_stats[2].bytes_sent == sum(
        records.wire_bytes(m.content[records.ARRAYS]) for m in messages)


@pytest.mark.usefixtures("flower_identity")
def test_too_few_accepted_updates_aggregate_nothing_and_ffa_digest_is_checked(
        ) -> None:
    strategy = build_strategy(FederationConfig(min_train_nodes=2, min_replies=2),
                              ffa_digest=123.0, min_train_nodes=2,
                              min_available_nodes=2)
    strategy.expected.current = {"w": np.zeros(1, np.float32)}
    query = Message(RecordDict({records.CONFIG: ConfigRecord()}), **QUERY_KW)
    good = _reply(query, {"w": torch.ones(1)}, 1)
    good.content[records.METRICS][records.LORA_A_DIGEST] = 123.0
    other = _reply(query, {"w": torch.ones(1)}, 1)
    other.content[records.METRICS][records.LORA_A_DIGEST] = 124.0
    arrays, metrics = strategy.aggregate_train(1, [good, other])
    assert arrays is None and metrics is None
    stats = strategy.round_stats[1]
    assert stats.accepted == 1
    assert "frozen LoRA A differs" in next(iter(stats.nodes_rejected.values()))
