"""The server's side of distributed noise (``privacy.noise: distributed``): SecAgg+
unmasks the sum of the sites' noised clipped-gradient sums; the server turns it
into one optimizer step on the global adapter.

What the server sees is post-processing of that sum, the Gaussian-like mechanism
:mod:`fedtune.common.distributed_noise` describes: dividing by the records that
took part (a count every reply states in the clear, as in every fedtune round),
and Adam's moments over the rounds (``federation.server_learning_rate``,
``server_beta_1``, ``server_beta_2``, ``server_tau``). A head-only round moves the
head alone: its adapter coordinates are zeros the sites sent without noise.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from fedtune.common.adapters import is_adapter
from fedtune.common.config import RunConfig

logger = logging.getLogger(__name__)


class ServerAdam:
    """Adam on the pooled gradient, per tensor (Kingma and Ba; bias-corrected)."""

    def __init__(self, *, lr: float, beta_1: float, beta_2: float, eps: float
                 ) -> None:
        self.lr, self.beta_1, self.beta_2, self.eps = lr, beta_1, beta_2, eps
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.steps: dict[str, int] = {}

    def step(self, name: str, weight: np.ndarray, grad: np.ndarray) -> np.ndarray:
        m = self.beta_1 * self.m.get(name, 0.0) + (1 - self.beta_1) * grad
        v = self.beta_2 * self.v.get(name, 0.0) + (1 - self.beta_2) * grad * grad
        k = self.steps.get(name, 0) + 1
        self.m[name], self.v[name], self.steps[name] = m, v, k
        m_hat, v_hat = m / (1 - self.beta_1**k), v / (1 - self.beta_2**k)
        out: np.ndarray = weight - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
        return out


class PooledStep:
    """The server's step on each round's pooled sum: divide by the records that
    took part, one Adam step on the tensors the round trained (a head-only
    round: the head alone)."""

    def __init__(self, *, cfg: RunConfig, names: list[str],
                 initial: list[np.ndarray]) -> None:
        fed = cfg.federation
        self.cfg, self.names = cfg, names
        self.current = [np.asarray(a, np.float64) for a in initial]
        self.adam = ServerAdam(lr=fed.server_learning_rate, beta_1=fed.server_beta_1,
                               beta_2=fed.server_beta_2, eps=fed.server_tau)

    def __call__(self, server_round: int, total: list[np.ndarray], *, shares: int,
                 records: int) -> list[np.ndarray]:
        """The new global arrays from ``total``, the unmasked sum of ``shares``
        sites' shares over ``records`` records."""
        head_only = self.cfg.head_only(server_round)
        new, norm2 = [], 0.0
        for name, weight, summed in zip(self.names, self.current, total, strict=True):
            if head_only and is_adapter(name):
                new.append(weight)  # frozen this round: the sites sent zeros
                continue
            grad = summed / records
            norm2 += float(np.sum(grad * grad))
            new.append(self.adam.step(name, weight, grad))
        self.current = new
        logger.info("distributed noise: round %d unmasked the sum of %d shares over "
                    "%d records; pooled gradient norm %.4g, one server Adam step "
                    "(lr %g)", server_round, shares, records, math.sqrt(norm2),
                    self.adam.lr)
        return new
