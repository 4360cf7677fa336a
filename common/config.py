"""Run configuration: YAML <-> frozen dataclasses <-> Flower's flat run_config.

One YAML file describes a run. Each section is a frozen dataclass whose
``__post_init__`` validates every field; :func:`from_dict` collects the problems of
all sections (unknown keys, wrong types, bad values) and raises them together in one
:class:`ConfigError`. Flower carries the run config as a flat mapping of scalars, so
:func:`to_run_config` flattens a :class:`RunConfig` into dotted kebab-case keys
(``train.learning-rate``) with lists JSON-encoded, and :func:`from_run_config`
reverses it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fedtune.common import recipes
from fedtune.common.errors import ConfigError

logger = logging.getLogger(__name__)

Scalar = bool | int | float | str
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, list | tuple) and all(_type_ok(v, item) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number"}.get(
        hint, "a string"
    )


class _Section:
    """Validation shared by every config section (types first, then values)."""

    SECTION = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        problems = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # a dataclass mixin
            value = getattr(self, f.name)
            numeric_text = isinstance(value, str) and _NUMBER.match(value)
            if hints[f.name] is float and numeric_text:
                value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
                object.__setattr__(self, f.name, value)
            if hints[f.name] is float and isinstance(value, int):
                if not isinstance(value, bool):  # accept 1 where 1.0 is meant
                    object.__setattr__(self, f.name, float(value))
                    continue
            if isinstance(value, list):  # lists from YAML become (hashable) tuples
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if not _type_ok(value, hints[f.name]):
                problems.append(
                    f"{self.SECTION}.{f.name}: expected {_describe(hints[f.name])}, "
                    f"got {value!r}"
                )
        try:  # value checks too, so one error lists everything
            problems += [f"{self.SECTION}.{p}" for p in self._check()]
        except TypeError:
            pass  # a wrongly typed field was already reported above
        if problems:
            raise ConfigError(problems)

    def _check(self) -> list[str]:
        """Return ``"field: problem"`` lines for values of the right type."""
        return []


def _positive(obj: object, *names: str) -> list[str]:
    return [f"{n}: must be > 0, got {getattr(obj, n)!r}" for n in names
            if _is_num(getattr(obj, n)) and getattr(obj, n) <= 0]


def _non_negative(obj: object, *names: str) -> list[str]:
    return [f"{n}: must be >= 0, got {getattr(obj, n)!r}" for n in names
            if _is_num(getattr(obj, n)) and getattr(obj, n) < 0]


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Which pretrained model to fine-tune, and for which task."""

    SECTION = "model"
    name_or_path: str = "fedtune:all-MiniLM-L6-v2"
    task: Literal["classification", "causal-lm"] = "classification"
    gguf_file: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Classification head's initial weights. "zero" starts every class at the same
    # logit, so the first noisy DP steps do not have to undo a random head.
    head_init: Literal["random", "zero"] = "zero"
    # 0: a linear head on the pooled features; N: linear(N) + GELU + linear.
    head_hidden: int = 0

    def _check(self) -> list[str]:
        out = _non_negative(self, "head_hidden")
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
    """

    SECTION = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    ffa: bool = False
    site_ranks: tuple[int, ...] = ()
    heterogeneous_ranks: bool = False
    top_layers: int = 0

    @property
    def mixed_ranks(self) -> bool:
        """Sites may train lower ranks than ``r`` (the server pads their updates)."""
        return bool(self.site_ranks) or self.heterogeneous_ranks

    def _check(self) -> list[str]:
        out = _positive(self, "r", "alpha")
        if self.top_layers < 0:
            out.append(f"top_layers: must be >= 0 (0: every layer), got "
                       f"{self.top_layers!r}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout: must be in [0, 1), got {self.dropout!r}")
        bad = [r for r in self.site_ranks if not 1 <= r <= self.r]
        if bad:
            out.append(f"site_ranks: each must be in [1, r={self.r}] (r is the global "
                       f"rank), got {bad}")
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
    of 8 (at a fixed 2, an epsilon-1 run could not afford it at all).

    ``personalize_epsilon`` (at ``target_delta``) is what a site's personalisation
    (``train.personalize_epochs``) may spend on top of the run; its DP-SGD noise is
    calibrated to it and it is charged to the site's ledger.

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

    @property
    def calibration_sigma(self) -> float:
        """The decision calibration's noise multiplier (``0`` resolved)."""
        if self.calibration_noise_multiplier > 0:
            return self.calibration_noise_multiplier
        return CALIBRATION_NOISE_AT_8 * max(1.0, 8.0 / self.target_epsilon)

    def _check(self) -> list[str]:
        out = _positive(self, "target_epsilon", "max_grad_norm",
                        "central_noise_multiplier", "central_clipping_norm",
                        "count_noise_multiplier", "personalize_epsilon")
        out += _non_negative(self, "noise_multiplier", "budget_epsilon",
                             "calibration_noise_multiplier")
        if not 0.0 <= self.linear_probe_budget < 1.0:
            out.append(f"linear_probe_budget: must be in [0, 1) (the share of "
                       f"target_epsilon for the linear-probe rounds; 0: one noise "
                       f"level for the whole run), got {self.linear_probe_budget!r}")
        if not 0.0 < self.target_delta < 1.0:
            out.append(f"target_delta: must be in (0, 1), got {self.target_delta!r}")
        return out


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Local training on a site (one call per round).

    The defaults are the DP recipe measured on the shipped ICD-10 task
    (bench/dp_recipe.py, bench/README.md); each piece is a key:

    - ``recipe``: the phases (head only, head then LoRA, LoRA), ``auto`` (the
      default) the one the measured map picks (:mod:`fedtune.common.recipes`);
      it sets ``linear_probe_rounds`` (and for ``head+lora`` ``lora.top_layers``
      and ``privacy.linear_probe_budget``) where they hold their defaults.

    - ``linear_probe_rounds``: LP-FT. Rounds ``1..linear_probe_rounds`` (``-1``,
      the default: every round; ``0``: none) train the classification head only
      (LoRA frozen): DP noise then spreads over ~8 k instead of ~80 k dimensions.
      Later rounds train LoRA + head. The head-only rounds train on each record's
      pooled features, computed once per run (the encoder does not change while
      LoRA is frozen), so they afford many steps (``linear_probe_epochs``; 0,
      the default: sqrt(records) DP steps per round within 10..40 at each site,
      :func:`fedtune.common.recipes.head_steps`, measured to grow with the site)
      at their own ``linear_probe_learning_rate`` (0:
      ``learning_rate``) and ``linear_probe_optimizer`` ("": ``optimizer``): SGD
      with momentum at 1.0 (then 20 epochs a round), where AdamW at 0.1 for 10
      gave macro-F1 0.602 +- 0.020 over 5 runs and SGD 0.620 +- 0.013 (bench/
      repeats.py): a
      coordinate only the DP noise drives moves by lr x noise under SGD, by ~lr
      under Adam's normalised step. The batch (so the sampling rate) is shared;
      the noise plan counts each phase's steps. A causal LM has no head: no such rounds.
    - ``batch_size``: the expected Poisson batch; 0 (the default) takes the
      recipe's, 512 for classification (the noise that matters is sigma / batch)
      and 16 for a causal LM (per-sample gradients of a language model's LoRA
      are large).
    - ``logit_adjustment`` (tau): train on ``logits + tau * log(prior)`` with the
      site's class prior counted under DP (Menon et al. 2021; FedLC, Zhang et al.
      2022). The model's own logits then score classes as if balanced, which undoes
      the pull of DP clipping and label skew towards the majority class.
    - ``calibrate_decisions``: after the last round every site releases, under DP,
      counts on its validation split that score a few decision biases
      ``strength * log(prior)`` between balanced and prior-matched; the server
      keeps the one with the best macro-F1 (see :mod:`fedtune.common.calibration`).
      Needs ``data.val_fraction`` > 0.
    - ``personalize_epochs`` (0: off): after the last round every site fine-tunes
      the best global adapter on its own data for that many epochs (at
      ``personalize_learning_rate``; 0: 0.02 for the head, measured, else the
      last round's), under DP with its own
      ``privacy.personalize_epsilon`` charged to the site's ledger, keeps the
      result on the site and reports only its own held-out scores, global and
      personalised. It trains what the last round trained (the head only in an
      all-head-only run) with the plain loss: no logit adjustment or class
      weights, so the copy learns the site's own class mix.
    - ``class_weighting``: per-record weights <= 1 (``sqrt`` or ``balanced``
      inverse frequency, the rarest class at 1) applied after per-sample clipping,
      so the sensitivity stays ``max_grad_norm``.

    The classification-only keys (the head rounds, the logit adjustment, the
    calibration) are ignored for a causal LM at their defaults and refused when
    set to anything else. Ask :class:`RunConfig` (``phase``, ``head_only``,
    ``probe_rounds``) for a round's effective settings.
    """

    SECTION = "train"
    local_epochs: int = 1
    max_steps: int = 0
    batch_size: int = 0  # 0: the recipe's (512 classification, 16 causal LM)
    eval_batch_size: int = 64
    optimizer: Literal["adamw", "sgd"] = "adamw"
    learning_rate: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    epoch_patience: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0
    recipe: Literal["auto", "head", "head+lora", "lora"] = "auto"
    linear_probe_rounds: int = -1  # -1: every round (classification); 0: none
    linear_probe_learning_rate: float = 1.0
    linear_probe_epochs: int = 0  # 0: by the site's records (recipes.head_steps)
    linear_probe_optimizer: Literal["", "adamw", "sgd"] = "sgd"
    logit_adjustment: float = 1.0
    class_weighting: Literal["none", "sqrt", "balanced"] = "none"
    calibrate_decisions: bool = True
    personalize_epochs: int = 0
    personalize_learning_rate: float = 0.0

    def _check(self) -> list[str]:
        out = _positive(self, "local_epochs", "eval_batch_size",
                        "learning_rate", "max_grad_norm")
        out += _non_negative(self, "max_steps", "weight_decay", "batch_size",
                             "epoch_patience",
                             "linear_probe_learning_rate", "linear_probe_epochs",
                             "logit_adjustment", "personalize_epochs",
                             "personalize_learning_rate")
        if self.linear_probe_rounds < -1:
            out.append(f"linear_probe_rounds: must be >= -1 (-1: every round, 0: "
                       f"none), got {self.linear_probe_rounds!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            out.append(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0.0 <= self.momentum < 1.0:
            out.append(f"momentum: must be in [0, 1), got {self.momentum!r}")
        return out


# data.max_length 0 follows the data: this percentile of the records' token
# lengths, at most this cap (longer records are truncated).
AUTO_LENGTH_PERCENTILE, AUTO_LENGTH_CAP = 99.0, 256

# The 21 chapters of the shipped ICD-10-CM data (fedtune:icd10-chapters), in order.
ICD10_CHAPTERS = (
    "infectious", "neoplasms", "blood-immune", "endocrine", "mental", "nervous",
    "eye", "ear", "circulatory", "respiratory", "digestive", "skin",
    "musculoskeletal", "genitourinary", "pregnancy", "perinatal", "congenital",
    "symptoms", "injury", "external-causes", "health-factors")


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the data is and how simulation splits it into sites.

    ``max_length`` (tokens per record; 0, the default: follow the data) truncates
    longer records; at 0 each data set (a site's records, the test set) takes the
    99th percentile of its own token lengths, at most 256, and logs it.

    ``max_records`` (0: all) keeps the first records of ``source`` before a
    simulation splits it into sites (the shipped files are shuffled, so this is a
    random sample); ``max_samples_per_site`` then caps each site.

    ``retention_source`` (causal LM): general text (one record per line, its text in
    ``retention_column``; ``fedtune:chitchat-retention`` ships offline) that the
    server scores before training and after every round (perplexity), to show
    whether fine-tuning damaged what the base model could do; the first
    ``max_retention_samples`` records (0: all).

    ``answer_pattern`` (causal LM): a regular expression whose named groups read
    an answer's fields; the server also scores greedy answers to the held-out
    prompts by exact match, whole and per field, every round
    (:mod:`fedtune.common.answers`). ``max_answer_samples`` bounds how many
    held-out prompts are answered (0: all)."""

    SECTION = "data"
    source: str = "fedtune:icd10-chapters"
    test_source: str = "fedtune:icd10-chapters-test"
    text_column: str = "text"
    label_column: str = "chapter"
    prompt_column: str = "prompt"
    response_column: str = "response"
    labels: tuple[str, ...] = ICD10_CHAPTERS
    max_length: int = 0  # 0: follow the data (fedtune.common.data.fit_length)
    partition: Literal["iid", "dirichlet", "column"] = "dirichlet"
    partition_column: str = "condition"
    dirichlet_alpha: float = 1.0
    val_fraction: float = 0.1
    max_records: int = 0  # the first N records of source, before partitioning
    max_samples_per_site: int = 0
    max_test_samples: int = 0
    retention_source: str = ""
    retention_column: str = "text"
    max_retention_samples: int = 200
    answer_pattern: str = ""
    max_answer_samples: int = 64

    @property
    def length_cap(self) -> int:
        """The token limit where no data decides it (inference, generation, the
        retention set): ``max_length``, else :data:`AUTO_LENGTH_CAP`."""
        return self.max_length or AUTO_LENGTH_CAP

    def _check(self) -> list[str]:
        out = _positive(self, "dirichlet_alpha")
        out += _non_negative(self, "max_length", "max_records", "max_samples_per_site",
                             "max_test_samples",
                             "max_retention_samples", "max_answer_samples")
        if self.answer_pattern:
            try:
                groups = re.compile(self.answer_pattern).groupindex
            except re.error as err:
                out.append(f"answer_pattern: not a regular expression ({err})")
            else:
                if not groups:
                    out.append("answer_pattern: needs named groups, one per field, "
                               "e.g. 'is (?P<sentiment>\\w+)'")
        if not 0.0 <= self.val_fraction < 0.5:
            out.append(f"val_fraction: must be in [0, 0.5), got {self.val_fraction!r}")
        if len(set(self.labels)) != len(self.labels):
            out.append(f"labels: must be distinct, got {self.labels!r}")
        if self.partition == "column" and not self.partition_column:
            out.append("partition_column: required when partition is 'column'")
        return out


Strategy = Literal["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
                   "median", "trimmed-mean", "krum", "multi-krum"]
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


@dataclass(frozen=True)
class RunConfig:
    """A whole run: one instance per section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    @property
    def selection_metric(self) -> str:
        """The metric that picks the best round (``auto`` resolved by task)."""
        chosen = self.federation.selection_metric
        if chosen != "auto":
            return chosen
        return "macro-f1" if self.model.task == "classification" else "loss"

    @property
    def classifies(self) -> bool:
        return self.model.task == "classification"

    @property
    def calibrates(self) -> bool:
        """Whether the run ends with the DP decision calibration (it scales the
        logit adjustment: with ``train.logit_adjustment`` 0 there is nothing to
        calibrate, and the server says so)."""
        return (self.classifies and self.train.calibrate_decisions
                and self.train.logit_adjustment > 0)

    @property
    def releases_class_histogram(self) -> bool:
        """Whether each site releases its class histogram (under DP) for the
        logit adjustment, the class weights or the decision calibration (whose
        biases follow the federation's prior)."""
        return self.classifies and (
            self.train.logit_adjustment > 0 or self.train.class_weighting != "none"
            or self.calibrates)

    @property
    def logit_adjustment(self) -> float:
        """The training loss's tau (0 for a causal LM)."""
        return self.train.logit_adjustment if self.classifies else 0.0

    @property
    def probe_rounds(self) -> int:
        """How many rounds (the first ones) train the head only."""
        if not self.classifies:
            return 0
        lp, rounds = self.train.linear_probe_rounds, self.federation.num_rounds
        return rounds if lp < 0 else min(lp, rounds)

    def head_only(self, server_round: int) -> bool:
        """Whether round ``server_round`` trains the classification head only."""
        return server_round <= self.probe_rounds

    def exchanges_head_only(self, server_round: int) -> bool:
        """Whether round ``server_round`` sends the head alone both ways: a
        head-only round leaves LoRA at its seeded initial value on every site (the
        head rounds come first), so only the head need travel. SecAgg+ rounds send
        the whole adapter (its masked vector has one fixed layout)."""
        return self.head_only(server_round) and not self.federation.secure_aggregation

    def phase(self, server_round: int, num_examples: int | None = None
              ) -> TrainConfig:
        """The effective settings of round ``server_round`` at a site of
        ``num_examples`` training records: the recipe's batch where ``batch_size``
        is 0, and a head-only round's own learning rate, optimizer and length
        (``linear_probe_epochs``; at 0 ``max_steps`` = the recipe's steps for
        the site's size, which needs ``num_examples``)."""
        t = self.train
        batch = t.batch_size or (recipes.BATCH if self.classifies else 16)
        if not self.head_only(server_round):
            return t if batch == t.batch_size else dataclasses.replace(
                t, batch_size=batch)
        steps = t.max_steps
        if not (t.linear_probe_epochs or steps):
            if num_examples is None:
                raise ValueError("a head round's length follows the site's records "
                                 "(train.linear_probe_epochs: 0): pass num_examples")
            steps = recipes.head_steps(num_examples)
        return dataclasses.replace(
            t, batch_size=batch, max_steps=steps,
            learning_rate=t.linear_probe_learning_rate or t.learning_rate,
            local_epochs=t.linear_probe_epochs or t.local_epochs,
            optimizer=t.linear_probe_optimizer or t.optimizer)


SECTIONS: dict[str, type[_Section]] = {
    f.name: typing.get_type_hints(RunConfig)[f.name]
    for f in dataclasses.fields(RunConfig)
}


RENAMED = {  # (section, old key) -> new key; the old key is read for one release
    ("train", "early_stopping_patience"): "epoch_patience",
    ("federation", "early_stopping_patience"): "round_patience",
}
SWEEP = "sweep"  # the search space of `fedtune sweep`; no part of a run's config


def from_dict(raw: Mapping[str, Any] | None) -> RunConfig:
    """Build a :class:`RunConfig`, reporting every problem at once.

    Raises
    ------
    ConfigError
        Listing each unknown key and each bad value with what it expects.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"top level: expected a mapping of sections, got {raw!r}")
    problems = [f"{k}: unknown section (known: {', '.join(SECTIONS)}, and sweep "
                "for fedtune sweep)" for k in raw if k not in SECTIONS and k != SWEEP]
    built: dict[str, Any] = {}
    used_old: dict[str, str] = {}  # "section.new" -> "section.old" the user wrote
    for name, cls in SECTIONS.items():
        values = raw.get(name)
        values = {} if values is None else values
        if not isinstance(values, Mapping):
            problems.append(f"{name}: expected a mapping of keys, got {values!r}")
            continue
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # (same)
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        problems += _renamed(name, values, used_old)
        if name == "data" and "source" in values and "test_source" not in values:
            # the built-in test set belongs to the built-in data only
            values["test_source"] = ""
        unknown = sorted(set(values) - known)
        problems += [f"{name}.{k}: unknown key (known: {', '.join(sorted(known))})"
                     for k in unknown]
        try:
            built[name] = cls(**{k: v for k, v in values.items() if k in known})
        except ConfigError as err:
            problems += err.problems
    if not problems:
        built, _ = recipes.resolve(built)
        problems += _cross_checks(built)
    if problems:
        raise ConfigError([_as_written(p, used_old) for p in problems])
    return RunConfig(**built)


def _renamed(section: str, values: dict[str, Any], used_old: dict[str, str]
             ) -> list[str]:
    """Read a renamed key under its new name (in place), with a deprecation
    warning naming the new key; both names at once is a problem."""
    out = []
    for (sec, old), new in RENAMED.items():
        if sec != section or old not in values:
            continue
        if new in values:
            out.append(f"{sec}.{old}: renamed {sec}.{new}, which is also set; keep "
                       f"only {sec}.{new}")
            continue
        logger.warning("%s.%s is deprecated and will be removed in the next "
                       "release: write %s.%s (same meaning)", sec, old, sec, new)
        values[new] = values.pop(old)
        used_old[f"{sec}.{new}"] = f"{sec}.{old}"
    return out


def _as_written(problem: str, used_old: Mapping[str, str]) -> str:
    """A problem about a renamed key names the key the user wrote."""
    for new, old in used_old.items():
        if problem.startswith(new + ":"):
            return f"{old}:{problem[len(new) + 1:]} (renamed {new})"
    return problem


def _cross_checks(sec: Mapping[str, Any]) -> list[str]:
    """Settings of different sections that cannot go together."""
    fed, lora, priv = sec["federation"], sec["lora"], sec["privacy"]
    train, model = sec["train"], sec["model"]
    out = []
    if model.task != "classification":
        # a key at its default or switched off is fine (a shared base config); a
        # value that would act on a classification head is refused
        defaults = TrainConfig()
        off = {"linear_probe_rounds": 0, "logit_adjustment": 0.0,
               "calibrate_decisions": False, "class_weighting": "none"}
        # (the head rounds' own learning rate, epochs and optimizer act only in
        # head rounds, which linear_probe_rounds decides: a saved config holding
        # an earlier default of theirs still loads)
        used = [f"train.{k}" for k in ("linear_probe_rounds", "logit_adjustment",
                                        "class_weighting", "calibrate_decisions")
                if getattr(train, k) not in (getattr(defaults, k), off.get(k))]
        used += ["model.head_hidden"] * bool(model.head_hidden)
        out += [f"{k}: needs model.task classification (it acts on the "
                f"classification head), got {model.task!r}" for k in used]
    probe = train.linear_probe_rounds
    probe = fed.num_rounds if probe < 0 else probe
    if priv.linear_probe_budget and not 0 < probe < fed.num_rounds:
        out.append("privacy.linear_probe_budget: needs train.linear_probe_rounds "
                   "between 1 and federation.num_rounds - 1 (a budget split needs "
                   "both phases)")
    if model.task == "classification" and train.calibrate_decisions and \
            train.logit_adjustment > 0 and not sec["data"].val_fraction:
        out.append("train.calibrate_decisions: needs data.val_fraction > 0 (each "
                   "site scores the candidate decisions on its own validation "
                   "split); set data.val_fraction (e.g. 0.1) or "
                   "train.calibrate_decisions: false")
    if priv.linear_probe_budget and priv.noise_multiplier:
        out.append("privacy.linear_probe_budget: cannot be combined with a fixed "
                   "privacy.noise_multiplier (the split calibrates the noise of "
                   "each phase); set one or the other")
    if fed.weighting != "examples" and (fed.strategy in _ROBUST or priv.central_dp
                                        or fed.secure_aggregation):
        out.append(f"federation.weighting: {fed.weighting!r} applies to the FedAvg "
                   f"family only; federation.strategy {fed.strategy!r}, "
                   "privacy.central_dp and federation.secure_aggregation weigh "
                   "sites their own way")
    if priv.central_dp and fed.strategy != "fedavg":
        out.append(f"privacy.central_dp: needs federation.strategy fedavg (central "
                   f"DP clips and averages uniformly), got {fed.strategy!r}")
    if fed.secure_aggregation and lora.mixed_ranks:
        out.append("lora.site_ranks: cannot be combined with federation.secure_"
                   "aggregation (SecAgg+ needs one shape on every site)")
    if train.personalize_epochs and not sec["data"].val_fraction:
        out.append("train.personalize_epochs: needs data.val_fraction > 0 (each site "
                   "scores the global and its personalised adapter on its own "
                   "held-out split)")
    if sec["data"].retention_source and model.task != "causal-lm":
        out.append("data.retention_source: needs model.task causal-lm (it scores "
                   "general text by perplexity)")
    metric = fed.selection_metric
    if (metric in ("macro-f1", "accuracy") and model.task != "classification") or (
            metric == "perplexity" and model.task == "classification"):
        out.append(f"federation.selection_metric: {metric!r} is not measured for "
                   f"model.task {model.task!r}; use loss, or "
                   + ("macro-f1 / accuracy" if model.task == "classification"
                      else "perplexity"))
    if fed.round_patience and not sec["data"].test_source:
        out.append("federation.round_patience: needs the central "
                   "evaluation set data.test_source (the rounds are compared on it)")
    if fed.secure_aggregation and priv.central_dp:
        out.append("privacy.central_dp: cannot be combined with federation.secure_"
                   "aggregation (central DP clips each site's update, which SecAgg+ "
                   "hides from the server)")
    return out


def to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Return the plain nested mapping that :func:`from_dict` accepts."""
    return {
        name: {k: list(v) if isinstance(v, tuple) else v
               for k, v in dataclasses.asdict(getattr(cfg, name)).items()}
        for name in SECTIONS
    }


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ``section.key=value`` strings into a nested mapping (values as YAML)."""
    out: dict[str, dict[str, Any]] = {}
    bad = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            bad.append(f"{pair!r}: expected section.key=value, "
                       "e.g. train.batch-size=32")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            bad.append(f"{pair!r}: value is not valid YAML ({err})")
            continue
        out.setdefault(section, {})[name.replace("-", "_")] = value
    if bad:
        raise ConfigError(bad)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, values in over.items():
        if isinstance(values, Mapping) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def load(path: str | Path | None = None,
         overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (or the defaults) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found; pass an existing YAML file")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        raw = loaded or {}
    return from_dict(_merge(raw, parse_overrides(overrides or [])))


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (written into every run directory)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


RUN_PATH = "fedtune.run-path"  # run_config key: exact run directory (set by the CLI)
RESUME = "fedtune.resume"  # run_config key: continue RUN_PATH from its saved state
PAST_STOP = "fedtune.past-early-stop"  # run_config key: resume a run that stopped early
SIMULATED = "fedtune.simulated"  # run_config key: sites are data.source partitions


def run_config_key(section: str, field: str) -> str:
    """The flat run_config key of ``section.field`` (``federation.round-timeout``)."""
    return f"{section}.{field.replace('_', '-')}"


def to_run_config(cfg: RunConfig) -> dict[str, Scalar]:
    """Flatten to Flower's run_config: ``section.kebab-key`` -> scalar."""
    flat: dict[str, Scalar] = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            name = run_config_key(section, key)
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def from_run_config(flat: Mapping[str, Any]) -> RunConfig:
    """Inverse of :func:`to_run_config`; keys outside the sections are ignored
    (Flower adds its own)."""
    raw: dict[str, dict[str, Any]] = {}
    list_fields = {
        (s, f.name)
        for s, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]  # cls is a dataclass
        if typing.get_origin(typing.get_type_hints(cls)[f.name]) is tuple
    }
    for key, value in flat.items():
        section, dot, name = str(key).partition(".")
        if not dot or section not in SECTIONS:
            continue
        name = name.replace("-", "_")
        if (section, name) in list_fields and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"{key}: expected a JSON list, got {value!r}") from err
        raw.setdefault(section, {})[name] = value
    return from_dict(raw)
