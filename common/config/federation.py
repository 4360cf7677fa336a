"""The federation section of a run config: rounds, strategy, aggregation,
robustness, secure aggregation, best-round selection.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from fedtune.common.config.base import (
    _non_negative,
    _positive,
    _Section,
)
from fedtune.common.config.training import (
    Strategy,
)

_ROBUST = ("median", "trimmed-mean", "krum", "multi-krum")  # weigh sites their way


@dataclass(frozen=True)
class FederationConfig(_Section):
    """Rounds, sampling and the simulated federation.

    ``max_update_norm`` (0: no bound) rejects a site's update that moves the
    adapter by more than this L2 norm; malformed updates are always rejected.

    ``strategy``: ``fedavg``; ``fedavgm`` (server momentum ``server_momentum``
    at ``server_learning_rate``: averages DP noise across rounds); ``fedprox``
    (``proximal_mu``); the server optimizers
    ``fedadam``, ``fedyogi``, ``fedadagrad`` (``server_learning_rate``,
    ``server_beta_1/2``, ``server_tau``); the robust ``median``, ``trimmed-mean``
    (``trim_fraction`` cut at each end), ``krum`` and ``multi-krum``
    (``krum_malicious`` assumed attackers, ``krum_select`` updates averaged, 0: all
    but the attackers).

    ``weighting``: how the FedAvg family weights a site's update: by its
    ``num-examples`` (FedAvg), by its square root, or uniformly (small sites that
    hold rare classes keep a voice).

    ``compression`` sends each site's update as an fp16 or int8 (per-tensor scale)
    delta from the global adapter. A round needs ``min_replies`` accepted updates
    within ``round_timeout`` seconds; otherwise it is retried ``round_retries``
    times, then the run stops (earlier rounds stay checkpointed and resumable).

    ``selection_metric`` picks the best round (``best -> checkpoints/round-K``) by
    the central evaluation: ``auto`` is macro-F1 for classification and the eval
    loss for a causal LM. ``round_patience`` (0: off) ends the run after
    that many rounds in a row without an improvement above ``min_delta``.

    ``secure_aggregation`` runs Flower's SecAgg+: the server sees only the sum of
    the sites' updates; a round survives sites dropping out after key sharing while
    ``secagg_threshold`` remain. Updates are quantized within
    ``+-secagg_clipping_range``.

    ``ray_address`` (simulation): empty starts a local Ray sized to this machine;
    ``auto`` or ``HOST:PORT`` runs the sites on an existing Ray cluster, each
    taking ``client_cpus`` and ``client_gpus`` of its resources.
    """

    SECTION = "federation"
    num_sites: int = 8
    num_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_train_nodes: int = 0  # 0: follow num_sites x fraction_train (train_nodes)
    strategy: Strategy = "fedavg"
    weighting: Literal["examples", "sqrt", "uniform"] = "examples"
    server_momentum: float = 0.9
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    server_beta_1: float = 0.9
    server_beta_2: float = 0.99
    server_tau: float = 1e-3
    trim_fraction: float = 0.2
    krum_malicious: int = 1
    krum_select: int = 0
    compression: Literal["none", "fp16", "int8"] = "none"
    min_replies: int = 1
    round_retries: int = 1
    run_dir: str = "runs"
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    ray_address: str = ""
    round_timeout: float = 3600.0
    max_update_norm: float = 0.0
    secure_aggregation: bool = False
    secagg_threshold: int = 2
    secagg_clipping_range: float = 8.0
    selection_metric: Literal["auto", "loss", "perplexity", "macro-f1",
                              "accuracy"] = "auto"
    round_patience: int = 0
    min_delta: float = 0.0

    def _check(self) -> list[str]:
        out = _positive(self, "num_sites", "num_rounds", "client_cpus",
                        "round_timeout", "secagg_clipping_range",
                        "server_learning_rate", "server_tau", "min_replies")
        out += _non_negative(self, "proximal_mu", "krum_malicious", "krum_select",
                             "round_retries", "min_train_nodes")
        for name in ("server_beta_1", "server_beta_2", "server_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                out.append(f"{name}: must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            out.append(f"trim_fraction: must be in [0, 0.5), got "
                       f"{self.trim_fraction!r}")
        if self.min_replies > self.train_nodes:
            out.append(f"min_replies: {self.min_replies} exceeds the {self.train_nodes}"
                       " sites a round trains (min_train_nodes, or num_sites x "
                       "fraction_train)")
        if self.secure_aggregation and (self.strategy != "fedavg"
                                        or self.compression != "none"):
            out.append("secure_aggregation: needs strategy fedavg and compression "
                       "none (SecAgg+ masks the plain update and shows the server "
                       "only the sum)")
        if self.secure_aggregation and not 2 <= self.secagg_threshold <= max(
                2, self.train_nodes):
            out.append(f"secagg_threshold: must be in [2, {self.train_nodes}] (the "
                       f"sites a round trains), got {self.secagg_threshold!r}")
        out += _non_negative(self, "client_gpus", "max_update_norm",
                             "round_patience", "min_delta")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                out.append(f"{name}: must be in [0, 1], got {getattr(self, name)!r}")
        if self.min_train_nodes > self.num_sites:
            out.append(f"min_train_nodes: {self.min_train_nodes} exceeds num_sites "
                       f"{self.num_sites}")
        address = self.ray_address
        if address and address != "auto" and not re.fullmatch(
                r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}", address):
            out.append(f"ray_address: {address!r} is not a Ray cluster's address; "
                       "write HOST:PORT of its head (the port `ray start --head` "
                       "printed, 6379 by default), `auto` (the cluster this machine "
                       "belongs to), or leave it empty for a local Ray")
        return out

    @property
    def train_nodes(self) -> int:
        """Sites a round waits for and trains: ``min_train_nodes`` when set, else
        ``fraction_train`` of ``num_sites`` (at least 1), so it follows
        ``num_sites`` when only that is changed."""
        return self.min_train_nodes or max(1, math.ceil(
            self.fraction_train * self.num_sites - 1e-9))
