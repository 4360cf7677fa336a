"""Noise plans: a class histogram and a linear-probe phase, composed exactly."""

from __future__ import annotations

import pytest

from fedtune.common import accounting
from fedtune.common.config import DataConfig, PrivacyConfig, RunConfig
from fedtune.common.errors import PrivacyError

Q, STEPS, ROUNDS = 0.1, 10, 4


def _spent(plan: accounting.NoisePlan, rounds: int = ROUNDS) -> float:
    return accounting.epsilon_spent(
        plan.history(q=Q, rounds=rounds),
        delta=1e-5)


def test_one_noise_level_spends_the_target_with_the_histogram() -> None:
    # Prepare
    cfg = PrivacyConfig(target_epsilon=3.0)
    # Execute
    plain = accounting.plan_schedule(cfg, q=Q, round_steps=STEPS,
                                     num_rounds=ROUNDS)
    counted = accounting.plan_schedule(cfg, q=Q, round_steps=STEPS,
                                       num_rounds=ROUNDS, count=True)
    # Assert: both land on the target; the histogram costs a little more noise
    assert _spent(plain) == pytest.approx(3.0, abs=0.01) and _spent(plain) <= 3.0
    assert _spent(counted) == pytest.approx(3.0, abs=0.01) and _spent(counted) <= 3.0
    assert counted.count_sigma == 20.0 and counted.tune_sigma > plain.tune_sigma
    assert plain.probe_sigma == plain.tune_sigma  # no split: one level


def test_linear_probe_budget_split_is_exact() -> None:
    # Prepare: 30 % of epsilon 8 for the first round (head only)
    cfg = PrivacyConfig(target_epsilon=8.0, linear_probe_budget=0.3)
    # Execute
    plan = accounting.plan_schedule(cfg, q=Q, round_steps=STEPS,
                                    num_rounds=ROUNDS, probe_rounds=1, count=True)
    # Assert: phase one spends 2.4 (histogram included), all of it spends 8
    assert _spent(plan, rounds=1) == pytest.approx(2.4, abs=0.01)
    assert _spent(plan) == pytest.approx(8.0, abs=0.01) and _spent(plan) <= 8.0
    assert plan.probe_sigma != plan.tune_sigma and plan.probe_rounds == 1


def test_fixed_noise_is_used_as_it_is() -> None:
    plan = accounting.plan_schedule(PrivacyConfig(noise_multiplier=1.3),
                                    q=Q, round_steps=STEPS,
                                    num_rounds=ROUNDS, probe_rounds=2)
    assert plan.probe_sigma == plan.tune_sigma == 1.3 and plan.count_sigma == 0.0


def test_a_histogram_that_spends_the_budget_is_refused() -> None:
    cfg = PrivacyConfig(target_epsilon=0.5, count_noise_multiplier=1.0)
    with pytest.raises(PrivacyError, match="already spend epsilon >= 0.5") as err:
        accounting.plan_schedule(cfg, q=Q, round_steps=STEPS,
                                 num_rounds=ROUNDS, count=True)
    assert "privacy.count_noise_multiplier" in str(err.value)  # names the fix


@pytest.mark.parametrize("eps", [0.5, 1.0, 3.0, 8.0, 20.0])
def test_the_calibration_release_follows_the_budget(eps: float) -> None:
    # Prepare: the recipe's releases (histogram + decision calibration), default noise
    cfg = PrivacyConfig(target_epsilon=eps)
    # Execute
    plan = accounting.plan_schedule(cfg, q=Q, round_steps=STEPS,
                                    num_rounds=ROUNDS, count=True,
                                    calibration_sigma=cfg.calibration_sigma)
    # Assert: 2 (as measured) from epsilon 8 up, 2 * 8 / eps below; a small budget
    # still leaves room for training, and the whole run lands on the target
    assert plan.calibration_sigma == pytest.approx(2.0 * max(1.0, 8.0 / eps))
    releases = accounting.epsilon_spent([(plan.count_sigma, 1.0, 1),
                                         (plan.calibration_sigma, 1.0, 1)], delta=1e-5)
    assert releases < 0.75 * eps
    whole = accounting.epsilon_spent(
        plan.history(q=Q, rounds=ROUNDS, ended=True), delta=1e-5)
    assert whole == pytest.approx(eps, abs=0.02) and whole <= eps + 1e-6


def test_an_explicit_calibration_noise_is_used_as_it_is() -> None:
    cfg = PrivacyConfig(target_epsilon=1.0, calibration_noise_multiplier=3.0)
    assert cfg.calibration_sigma == 3.0
    with pytest.raises(PrivacyError, match="calibration_noise_multiplier"):
        accounting.plan_schedule(cfg, q=Q, round_steps=STEPS,
                                 num_rounds=ROUNDS, count=True,
                                 calibration_sigma=cfg.calibration_sigma)


@pytest.mark.parametrize("eps", [0.5, 8.0])
def test_the_two_class_histogram_gets_half_the_noise(eps: float) -> None:
    # Prepare: a two-class run and a many-class one, default calibration noise
    two = RunConfig(data=DataConfig(labels=("a", "b")),
                    privacy=PrivacyConfig(target_epsilon=eps))
    many = RunConfig(data=DataConfig(labels=("a", "b", "c")),
                     privacy=PrivacyConfig(target_epsilon=eps))
    # Execute
    plan = accounting.plan_schedule(two.privacy, q=Q, round_steps=STEPS,
                                    num_rounds=ROUNDS, count=True,
                                    calibration_sigma=two.calibration_sigma)
    # Assert: half the counts' noise, an explicit one kept, the run on its target
    assert two.calibration_sigma == pytest.approx(many.calibration_sigma / 2)
    assert RunConfig(data=DataConfig(labels=("a", "b")), privacy=PrivacyConfig(
        calibration_noise_multiplier=3.0)).calibration_sigma == 3.0
    whole = accounting.epsilon_spent(
        plan.history(q=Q, rounds=ROUNDS, ended=True), delta=1e-5)
    assert whole == pytest.approx(eps, abs=0.02) and whole <= eps + 1e-6


def test_prior_and_weights_from_noisy_counts() -> None:
    prior = accounting.class_prior([900.0, 100.0, -3.0])  # noise pushed one below 0
    assert prior == pytest.approx([900 / 1000.5, 100 / 1000.5, 0.5 / 1000.5])
    sqrt = accounting.class_weights([0.8, 0.2], mode="sqrt")
    assert sqrt == pytest.approx([0.5, 1.0])
    assert accounting.class_weights([0.8, 0.2], mode="balanced") == pytest.approx(
        [0.25, 1.0])
    assert accounting.class_weights([0.8, 0.2], mode="none") == [1.0, 1.0]


def test_head_only_rounds_may_take_their_own_steps() -> None:
    # Prepare: 2 head-only rounds of 50 steps, then 2 rounds of 10
    cfg = PrivacyConfig(target_epsilon=4.0)
    # Execute
    plan = accounting.plan_schedule(cfg, q=Q, round_steps=STEPS,
                                    num_rounds=ROUNDS, probe_rounds=2,
                                    probe_steps_per_round=50)
    # Assert: one sigma over 2 * 50 + 2 * 10 steps, spending the target
    assert [plan.steps(r) for r in (1, 2, 3, 4)] == [50, 50, 10, 10]
    assert plan.history(q=Q, rounds=3) == [
        (plan.probe_sigma, Q, 100), (plan.tune_sigma, Q, 10)]
    assert _spent(plan) == pytest.approx(4.0, abs=0.01) and _spent(plan) <= 4.0


def test_run_plan_reads_the_phases_from_the_config() -> None:
    from fedtune.common import config

    cfg = config.from_dict({"train": {"batch_size": 100, "local_epochs": 1,
                                      "linear_probe_rounds": 2,
                                      "linear_probe_epochs": 5},
                            "federation": {"num_rounds": 3}})
    q, plan = accounting.run_plan(cfg, num_examples=1000)
    assert q == 0.1 and (plan.probe_steps, plan.tune_steps) == (50, 10)
    assert cfg.phase(2).local_epochs == 5 and cfg.phase(3) is cfg.train
    assert cfg.head_only(2) and not cfg.head_only(3) and cfg.probe_rounds == 2
