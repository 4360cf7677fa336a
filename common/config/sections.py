"""The model, LoRA and privacy sections of a run config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedtune.common.config.base import (
    _non_negative,
    _positive,
    _Section,
)


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Which pretrained model to fine-tune, and for which task."""

    SECTION = "model"
    name_or_path: str = "fedtune:all-MiniLM-L6-v2"
    task: Literal["classification", "causal-lm"] = "classification"
    gguf_file: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Classification head's initial weights. "labels" (the default): each class's
    # row is the encoder's embedding of its label description (data.label_
    # descriptions, else the label's name), so round 0 already predicts the nearest
    # label, at no privacy cost (label names are public; fedtune.common.priors).
    # "zero" starts every class at the same logit; "random" as torch draws it.
    head_init: Literal["labels", "random", "zero"] = "labels"
    # "labels": the logit a record whose features point the way of a label's
    # embedding gets; 0 (the default): by the typical site's records (weighted as
    # the average weighs the sites), measured
    # (fedtune.common.recipes.prior_scale): a large prior steadies small sites, a
    # small one leaves large sites free to learn.
    head_init_scale: float = 0.0
    # 0: a linear head on the pooled features; N: linear(N) + GELU + linear.
    head_hidden: int = 0

    def _check(self) -> list[str]:
        out = _non_negative(self, "head_hidden", "head_init_scale")
        if self.head_init == "labels" and self.head_hidden:
            out.append("head_init: 'labels' sets a linear head's rows from the label "
                       "embeddings; with model.head_hidden > 0 use head_init: zero "
                       "or random")
        if not self.name_or_path.strip():
            out.append("name_or_path: must name a local directory or a hub model id")
        return out



@dataclass(frozen=True)
class LoraConfig(_Section):
    """LoRA adapter shape. Empty ``target_modules`` means the architecture default.

    ``ffa`` (FFA-LoRA): every A is frozen at its shared seed-initialised value and
    only B (+ head) is trained and sent, so averaging is exact and the bytes halve.
    ``site_ranks`` (heterogeneous ranks, HetLoRA-style): simulated site ``p`` trains
    rank ``site_ranks[p % len]``; ``r`` is the global (maximum) rank. In a deployment
    sites choose their rank (``fedtune client --lora-rank``) and the run sets
    ``heterogeneous_ranks: true`` (implied by ``site_ranks``) for the server to
    accept lower-rank updates. Each site keeps the scaling ``alpha / r`` so its adapter
    is exactly the first ranks of the global one.
    ``top_layers`` (k > 0): LoRA on the top k transformer layers only; the hidden
    states entering them are computed once per record and cached, so a LoRA step
    runs k layers (:mod:`fedtune.common.toplayers`). 0: every layer.
    ``method``: the adapter this section shapes (:mod:`fedtune.common.adapters`):
    ``lora`` (the default), ``bitfit`` (bias-only), ``layernorm`` (LayerNorm-only)
    or ``ia3``; ``top_layers`` and ``target_modules`` apply to each, ``r``,
    ``alpha``, ``dropout``, ``ffa`` and ranks to LoRA only. A causal LM also takes
    ``prompt`` (prompt tuning: ``virtual_tokens`` trained input embeddings before
    every prompt) and ``prefix`` (prefix tuning: ``virtual_tokens`` trained keys
    and values in every layer); both reach every layer, so ``top_layers`` is 0.
    """

    SECTION = "lora"
    method: Literal["lora", "bitfit", "layernorm", "ia3", "prompt", "prefix"] = "lora"
    virtual_tokens: int = 8
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    ffa: bool = False
    site_ranks: tuple[int, ...] = ()
    heterogeneous_ranks: bool = False
    top_layers: int = 0

    @property
    def prompt_method(self) -> bool:
        """Prompt or prefix tuning: virtual tokens that reach every layer."""
        return self.method in ("prompt", "prefix")

    @property
    def mixed_ranks(self) -> bool:
        """Sites may train lower ranks than ``r`` (the server pads their updates)."""
        return bool(self.site_ranks) or self.heterogeneous_ranks

    def _check(self) -> list[str]:
        out = _positive(self, "r", "alpha", "virtual_tokens")
        if self.prompt_method and self.top_layers:
            out.append(f"method {self.method} reaches every layer (its virtual "
                       "tokens enter the attention of each): set top_layers: 0, or "
                       "use ia3 or lora on the top layers")
        if self.top_layers < 0:
            out.append(f"top_layers: must be >= 0 (0: every layer), got "
                       f"{self.top_layers!r}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout: must be in [0, 1), got {self.dropout!r}")
        bad = [r for r in self.site_ranks if not 1 <= r <= self.r]
        if bad:
            out.append(f"site_ranks: each must be in [1, r={self.r}] (r is the global "
                       f"rank), got {bad}")
        if self.method != "lora" and (self.ffa or self.mixed_ranks):
            out.append(f"ffa and site_ranks shape LoRA's A and B; lora.method "
                       f"{self.method} has neither: drop them or use method: lora")
        if self.ffa and self.mixed_ranks:
            out.append("ffa and site_ranks cannot be combined: FFA-LoRA freezes A at "
                       "one shared rank-r value; use one or the other")
        return out


CALIBRATION_NOISE_AT_8 = 2.0  # bench/calibration.py measured the recipe with it


@dataclass(frozen=True)
class PrivacyConfig(_Section):
    """Record-level DP-SGD on each site (Opacus).

    With ``noise_multiplier == 0`` the noise is calibrated so that the planned rounds
    spend exactly ``target_epsilon`` at ``target_delta``.

    ``central_dp`` adds server-side clipping of each site's update to
    ``central_clipping_norm`` and Gaussian noise (``central_noise_multiplier``) on
    their uniform average: client-level DP on top of record-level DP-SGD.

    ``secure_noise`` draws the DP-SGD noise and the Poisson batches from the OS's
    entropy. ``false`` seeds them from ``train.seed`` (reproducible experiments and
    bit-for-bit resume tests only: anyone who knows the seed can subtract the noise).

    ``linear_probe_budget`` (with ``train.linear_probe_rounds``) is the share of
    ``target_epsilon`` the head-only rounds spend; the later rounds get the rest,
    calibrated over the exact composition of both (0: one noise level throughout).
    ``count_noise_multiplier`` is the Gaussian noise (in records) on the class
    histogram a site releases once per run for ``train.logit_adjustment`` and
    ``train.class_weighting``; it is charged to the ledger and the DP-SGD noise is
    calibrated so that histogram + training together spend ``target_epsilon``.
    ``calibration_noise_multiplier`` is the Gaussian noise (per unit of L2
    sensitivity) on the validation counts a site releases once, after the last
    round, for ``train.calibrate_decisions``; it is planned and charged like the
    histogram. 0 (the default) follows the budget: 2 (what the recipe was measured
    with at epsilon 8) for ``target_epsilon >= 8``, ``2 * 8 / target_epsilon``
    below, so that the release keeps about the share of a smaller budget it has
    of 8 (at a fixed 2, an epsilon-1 run could not afford it at all); half that
    for a two-class task's histogram (``RunConfig.calibration_sigma``).

    ``personalize_epsilon`` (at ``target_delta``) is what a site's personalisation
    (``train.personalize_epochs``) may spend on top of the run; its DP-SGD noise is
    calibrated to it and it is charged to the site's ledger.

    ``noise``: ``local`` (each site adds the whole DP-SGD noise to its own
    update) or ``distributed`` (with ``federation.secure_aggregation``: each round
    is one full-batch DP step whose noise the sites share, so the unmasked sum
    carries it once; :mod:`fedtune.common.distributed_noise`).
    ``max_dropped_or_colluding`` (``t``): under distributed noise, how many of a
    round's sites may drop out or collude with the server while the sum still
    carries the whole noise (each share is ``1/(n - t)`` of its variance).

    ``ledger_dir`` and ``budget_epsilon`` are for simulations only: a deployed site
    keeps its own ledger and budget (``fedtune client --ledger-dir --budget-epsilon``)
    and ignores these two.
    """

    SECTION = "privacy"
    enabled: bool = True
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"
    # Opacus's "ew" (expanded weights) is not offered: its module takes one
    # positional input, and Hugging Face models are called with keywords
    # (bench/dp_overhead.py records the TypeError).
    grad_sample_mode: Literal["hooks", "functorch"] = "hooks"
    ledger_dir: str = ""
    budget_epsilon: float = 0.0
    secure_noise: bool = True
    central_dp: bool = False
    central_noise_multiplier: float = 1.0
    central_clipping_norm: float = 1.0
    linear_probe_budget: float = 0.0
    count_noise_multiplier: float = 20.0
    calibration_noise_multiplier: float = 0.0
    personalize_epsilon: float = 1.0
    noise: Literal["local", "distributed"] = "local"
    max_dropped_or_colluding: int = 1

    @property
    def calibration_sigma(self) -> float:
        """The many-class calibration counts' noise multiplier (``0`` resolved;
        a run's release uses ``RunConfig.calibration_sigma``)."""
        if self.calibration_noise_multiplier > 0:
            return self.calibration_noise_multiplier
        return CALIBRATION_NOISE_AT_8 * max(1.0, 8.0 / self.target_epsilon)

    def _check(self) -> list[str]:
        out = _positive(self, "target_epsilon", "max_grad_norm",
                        "central_noise_multiplier", "central_clipping_norm",
                        "count_noise_multiplier", "personalize_epsilon")
        out += _non_negative(self, "noise_multiplier", "budget_epsilon",
                             "calibration_noise_multiplier",
                             "max_dropped_or_colluding")
        if not 0.0 <= self.linear_probe_budget < 1.0:
            out.append(f"linear_probe_budget: must be in [0, 1) (the share of "
                       f"target_epsilon for the linear-probe rounds; 0: one noise "
                       f"level for the whole run), got {self.linear_probe_budget!r}")
        if not 0.0 < self.target_delta < 1.0:
            out.append(f"target_delta: must be in (0, 1), got {self.target_delta!r}")
        return out
