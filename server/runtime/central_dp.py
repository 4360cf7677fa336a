"""Central (client-level) DP on the server: clip each site's update, average them
uniformly, add Gaussian noise to the average, and account the releases.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` does the same clipping and
noise, but skips aggregation as soon as one reply is an error, and in fedtune a site
that declines a round (its privacy budget is spent) answers with an error. So this
is a small subclass of :class:`FedTuneAvg` that reuses Flower's clipping and noise
helpers and aggregates the replies that came.

Accounting: each round is one Gaussian mechanism with sensitivity ``C / n`` (``n``
sites averaged, each update clipped to L2 norm ``C``) and noise std
``sigma * C / n``; ``k`` rounds compose with the RDP accountant, without
amplification by client sampling (conservative). The result is a *client-level*
epsilon: it bounds what the released adapters reveal about whether any one site
took part at all, on top of each site's record-level DP-SGD.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.supercore.differential_privacy import (
    add_gaussian_noise_inplace,
    compute_clip_model_update,
    get_norm,
)

from fedtune.common import records
from fedtune.common.accounting import epsilon_spent
from fedtune.server.runtime.strategy import FedTuneAvg

logger = logging.getLogger(__name__)


def client_epsilon(*, noise_multiplier: float, releases: int, delta: float) -> float:
    """Client-level epsilon of ``releases`` noisy averages (RDP, no amplification)."""
    return epsilon_spent([(noise_multiplier, 1.0, releases)], delta=delta)


class CentralDPAvg(FedTuneAvg):
    """FedAvg with server-side fixed clipping and Gaussian noise (DP-FedAvg)."""

    def __init__(self, *, noise_multiplier: float, clipping_norm: float,
                 delta: float, **kwargs: object) -> None:
        super().__init__(**{**kwargs, "weighting": "uniform"})  # type: ignore[arg-type]  # kwargs
        if noise_multiplier <= 0 or clipping_norm <= 0:
            raise ValueError("central DP needs noise_multiplier > 0 and "
                             "clipping_norm > 0")
        self.noise_multiplier, self.clipping_norm = noise_multiplier, clipping_norm
        self.delta, self.releases = delta, 0

    def _clip(self, reply: Message) -> None:
        record = reply.content[records.ARRAYS]
        values = record.to_numpy_ndarrays()  # type: ignore[union-attr]  # an ArrayRecord
        current = [self.current[k] for k in record.keys()]
        delta = [v - c for v, c in zip(values, current, strict=True)]
        if get_norm(delta) > 0:  # Flower's clip divides by the norm
            compute_clip_model_update(param1=values, param2=current,
                                      clipping_norm=self.clipping_norm)
        reply.content[records.ARRAYS] = ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in zip(record.keys(), values,
                                                      strict=True)})

    def _combine(self, server_round: int, good: list[Message]
                 ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        for reply in good:  # validated and decoded: shapes match the global
            self._clip(reply)
        arrays, metrics = super()._combine(server_round, good)
        if arrays is None or not good:
            return arrays, metrics
        # the frozen tensors of a head-only round are public constants, the same
        # in every update (their delta is 0): only what the sites trained is noised
        names = list(arrays.keys())
        noisy = arrays.to_numpy_ndarrays()
        std = self.noise_multiplier * self.clipping_norm / len(good)
        add_gaussian_noise_inplace(  # in place, on the trained arrays only
            [a for k, a in zip(names, noisy, strict=True)
             if k not in self.expected.frozen], std)
        self.releases += 1
        eps = client_epsilon(noise_multiplier=self.noise_multiplier,
                             releases=self.releases, delta=self.delta)
        self.client_epsilon[server_round] = eps
        logger.info("central DP: %d updates clipped to %.3g, noise std %.3g; "
                    "client-level epsilon %.3f (delta %g) after %d rounds",
                    len(good), self.clipping_norm, std, eps, self.delta,
                    self.releases)
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in
                            zip(names, noisy, strict=True)}), metrics

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        arrays, scalars = super().state()
        return arrays, {**scalars, "central-dp-releases": float(self.releases)}

    def restore(self, arrays: Mapping[str, np.ndarray],
                scalars: Mapping[str, float]) -> None:
        super().restore(arrays, scalars)
        self.releases = int(scalars.get("central-dp-releases", 0))
