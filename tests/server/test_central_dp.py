"""Central DP: clipping, uniform averaging and noise on arrays; its accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from opacus.accountants import RDPAccountant

from fedtune.common import records
from fedtune.common.config import FederationConfig, PrivacyConfig
from fedtune.server.runtime.central_dp import CentralDPAvg, client_epsilon
from fedtune.server.runtime.registry import build_strategy
from tests.server.test_strategy import _reply


def _strategy(sigma: float, clip: float) -> CentralDPAvg:
    s = build_strategy(FederationConfig(), privacy=PrivacyConfig(
        central_dp=True, central_noise_multiplier=sigma, central_clipping_norm=clip),
        min_train_nodes=1, min_available_nodes=1)
    assert isinstance(s, CentralDPAvg)
    return s


def _round(strategy: CentralDPAvg, current: dict[str, torch.Tensor],
           states: list[dict[str, torch.Tensor]], *, declined: bool = False
           ) -> dict[str, torch.Tensor]:
    query = Message(RecordDict({records.CONFIG: ConfigRecord()}), dst_node_id=1,
                    message_type="train")
    strategy.expected.current = {k: v.numpy() for k, v in current.items()}
    replies = [_reply(query, s, n) for s, n in zip(states, (10, 1000), strict=True)]
    if declined:
        replies.append(Message(Error(code=0, reason="<'PrivacyBudgetExhausted on "
                                     "the site'>"), reply_to=query))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert isinstance(arrays, ArrayRecord)
    return records.from_record(arrays)


@pytest.mark.usefixtures("flower_identity")
def test_updates_are_clipped_and_averaged_uniformly() -> None:
    # Prepare: global 0; update norms 5 (clipped to 1) and 0.5 (kept)
    current = {"a": torch.zeros(4)}
    states = [{"a": torch.tensor([3.0, 4.0, 0.0, 0.0])},
              {"a": torch.tensor([0.0, 0.0, 0.3, 0.4])}]
    strategy = _strategy(sigma=1e-12, clip=1.0)
    # Execute (one site declined: aggregation still happens)
    agg = _round(strategy, current, states, declined=True)
    # Assert: ([0.6, 0.8, 0, 0] + [0, 0, 0.3, 0.4]) / 2, equal weights despite 10 vs
    # 1000 examples
    assert torch.allclose(agg["a"], torch.tensor([0.3, 0.4, 0.15, 0.2]), atol=1e-6)
    assert strategy.round_stats[1].nodes_declined and strategy.releases == 1


@pytest.mark.usefixtures("flower_identity")
def test_noise_std_is_sigma_clip_over_n() -> None:
    current = {"a": torch.zeros(20_000)}
    states = [{"a": torch.zeros(20_000)}, {"a": torch.zeros(20_000)}]
    agg = _round(_strategy(sigma=2.0, clip=0.5), current, states)
    assert float(np.std(agg["a"].numpy())) == pytest.approx(2.0 * 0.5 / 2, rel=0.03)


def test_client_epsilon_matches_opacus_without_amplification() -> None:
    reference = RDPAccountant()
    for _ in range(5):
        reference.step(noise_multiplier=1.3, sample_rate=1.0)
    assert client_epsilon(noise_multiplier=1.3, releases=5, delta=1e-5) == \
        pytest.approx(reference.get_epsilon(delta=1e-5))
    assert client_epsilon(noise_multiplier=1.3, releases=1, delta=1e-5) < \
        client_epsilon(noise_multiplier=1.3, releases=5, delta=1e-5)
    assert math.isfinite(client_epsilon(noise_multiplier=1.3, releases=1,
                                        delta=1e-5))
