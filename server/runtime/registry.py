"""The strategy ``federation.strategy`` names: one table from config to class.

Kept apart from :mod:`.strategy` so that strategies built on the FedTune mixin
(:mod:`.central_dp`) import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedtune.common.config import FederationConfig, PrivacyConfig
from fedtune.server.runtime.central_dp import CentralDPAvg
from fedtune.server.runtime.strategy import (
    FedTuneAdagrad,
    FedTuneAdam,
    FedTuneAvg,
    FedTuneAvgM,
    FedTuneKrum,
    FedTuneMedian,
    FedTuneProx,
    FedTuneStrategy,
    FedTuneTrimmedAvg,
    FedTuneYogi,
)


def build_strategy(fed: FederationConfig | None = None, *,
                   privacy: PrivacyConfig | None = None,
                   ffa_digest: float | None = None, lower_ranks: bool = False,
                   **kwargs: object) -> FedTuneStrategy:
    """The strategy ``federation.strategy`` names, with central DP if asked.

    ``kwargs`` go to Flower's strategy (sampling fractions and minimums).
    """
    fed = fed or FederationConfig()
    common: dict[str, Any] = {
        "max_update_norm": fed.max_update_norm, "compression": fed.compression,
        "min_replies": fed.min_replies, "ffa_digest": ffa_digest,
        "lower_ranks": lower_ranks, "weighting": fed.weighting, **kwargs}
    opt: dict[str, Any] = {"eta": fed.server_learning_rate, "beta_1": fed.server_beta_1,
           "beta_2": fed.server_beta_2, "tau": fed.server_tau}
    if privacy is not None and privacy.central_dp:  # on fedavg: the config checks
        return CentralDPAvg(noise_multiplier=privacy.central_noise_multiplier,
                            clipping_norm=privacy.central_clipping_norm,
                            delta=privacy.target_delta, **common)
    made: dict[str, Callable[[], FedTuneStrategy]] = {
        "fedavg": lambda: FedTuneAvg(**common),
        "fedavgm": lambda: FedTuneAvgM(server_learning_rate=fed.server_learning_rate,
                                       server_momentum=fed.server_momentum,
                                       **common),
        "fedprox": lambda: FedTuneProx(proximal_mu=fed.proximal_mu, **common),
        "fedadam": lambda: FedTuneAdam(**opt, **common),
        "fedyogi": lambda: FedTuneYogi(**opt, **common),
        "fedadagrad": lambda: FedTuneAdagrad(eta=fed.server_learning_rate,
                                             tau=fed.server_tau, **common),
        "median": lambda: FedTuneMedian(**common),
        "trimmed-mean": lambda: FedTuneTrimmedAvg(beta=fed.trim_fraction, **common),
        "krum": lambda: FedTuneKrum(num_malicious_nodes=fed.krum_malicious,
                                    select=1, **common),
        "multi-krum": lambda: FedTuneKrum(num_malicious_nodes=fed.krum_malicious,
                                          select=fed.krum_select, **common),
    }
    return made[fed.strategy]()  # the config admits only these names
