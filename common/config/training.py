"""The train and data sections of a run config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fedtune.common.config.base import (
    _non_negative,
    _positive,
    _Section,
)


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


def describe_problems(labels: tuple[str, ...], descriptions: tuple[str, ...]
                      ) -> list[str]:
    """What is wrong with ``data.label_descriptions`` against ``data.labels``
    (labels not yet known, to be read from the data: only the descriptions)."""
    if not descriptions:
        return []
    out = []
    if labels and len(descriptions) != len(labels):
        out.append(f"label_descriptions: {len(descriptions)} given for "
                   f"{len(labels)} data.labels; give one per label, in data.labels' "
                   "order (or none: the label names)")
    blank = [i for i, d in enumerate(descriptions) if not str(d).strip()]
    if blank:
        out.append(f"label_descriptions: empty at position(s) {blank}; describe "
                   "every label (data.labels), or give none")
    seen = [d for i, d in enumerate(descriptions) if d in descriptions[:i]]
    if seen:
        out.append(f"label_descriptions: {sorted(set(seen))} given twice; each "
                   "label (data.labels) needs words of its own")
    return out


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the data is and how simulation splits it into sites.

    ``max_length`` (tokens per record; 0, the default: follow the data) truncates
    longer records; at 0 each data set (a site's records, the test set) takes the
    99th percentile of its own token lengths, at most 256, and logs it.

    ``partition``: ``iid``; ``dirichlet`` (label skew at ``dirichlet_alpha``:
    over the labels for a classifier, over ``partition_column``'s values for a
    causal LM); ``column`` (whole groups of ``partition_column``'s values per site).

    ``max_records`` (0: all) keeps the first records of ``source`` before a
    simulation splits it into sites (the shipped files are shuffled, so this is a
    random sample); ``max_samples_per_site`` then caps each site.

    ``retention_source`` (causal LM): general text (one record per line, its text in
    ``retention_column``; ``fedtune:chitchat-retention`` ships offline) that the
    server scores before training and after every round (perplexity), to show
    whether fine-tuning damaged what the base model could do; the first
    ``max_retention_samples`` records (0: all).

    ``labels``: the classes, in the order of the head's outputs. A config that
    names its own ``source`` but no ``labels`` takes the training file's distinct
    labels, sorted (:func:`fedtune.common.data.with_labels`), logged and written
    to the run's config.

    ``label_descriptions`` (classification): public words for each label, one per
    label in ``labels``' order, e.g. an ICD-10 chapter's title; the head starts
    from their embeddings (``model.head_init: labels``). Empty: the label names
    themselves ("blood-immune" reads as "blood immune").

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
    label_descriptions: tuple[str, ...] = ()
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
        out += describe_problems(self.labels, self.label_descriptions)
        if self.partition == "column" and not self.partition_column:
            out.append("partition_column: required when partition is 'column'")
        return out


Strategy = Literal["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
                   "median", "trimmed-mean", "krum", "multi-krum"]
