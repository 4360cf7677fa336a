"""A whole run's config (:class:`RunConfig`, one instance per section) and what
it derives: the selection metric, the DP recipe's phases, head-only rounds.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from fedtune.common import recipes
from fedtune.common.config.base import (
    _Section,
)
from fedtune.common.config.federation import FederationConfig
from fedtune.common.config.sections import (
    LoraConfig,
    ModelConfig,
    PrivacyConfig,
)
from fedtune.common.config.training import (
    DataConfig,
    TrainConfig,
)


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
    def calibration_sigma(self) -> float:
        """The decision calibration's noise multiplier: ``privacy.
        calibration_noise_multiplier``, or (0) resolved: 2 at epsilon >= 8 for the
        many-class counts, half that for the two-class histogram (sensitivity 1,
        and the decision's only evidence: about 2.1 of epsilon 8 instead of 0.5,
        bench/README.md section 10c)."""
        p = self.privacy
        if p.calibration_noise_multiplier > 0 or len(self.data.labels) != 2:
            return p.calibration_sigma
        return p.calibration_sigma / 2

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
        the site's size, which needs ``num_examples``). Under distributed noise
        every round is one full-batch step (``batch_size`` = the records)."""
        t = self.train
        if self.privacy.noise == "distributed":  # one full-batch DP step a round
            return dataclasses.replace(
                t, batch_size=max(1, num_examples or t.batch_size or 1),
                max_steps=1, local_epochs=1)
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
