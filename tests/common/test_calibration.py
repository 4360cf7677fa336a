"""Decision calibration's arithmetic: counts, their sensitivity, the estimates."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fedtune.common import calibration, metrics


def _toy(seed: int = 0, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Two classes, 15 % minority; logits that favour the minority (as a head
    trained with the logit adjustment does)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.15).astype(np.int64)
    logits = np.stack([np.zeros(n), 2.0 * labels - 0.8 + rng.normal(0, 1, n)], 1)
    return logits, labels


def test_counts_give_the_per_class_metrics_of_each_candidate() -> None:
    logits, labels = _toy()
    biases = calibration.candidate_biases([0.85, 0.15], calibration.STRENGTHS)
    exact = calibration.counts(logits, labels, biases)
    found = calibration.estimates(exact, calibration.STRENGTHS)
    for k, est in enumerate(found):
        pred = np.argmax(logits + biases[k], 1).tolist()
        report = metrics.classification_report(labels.tolist(), pred,
                                               labels=["a", "b"])
        assert est.macro_f1 == pytest.approx(report["macro-f1"])
        assert est.recall[1] == pytest.approx(report["recall-b"])
    # strength 0 keeps the balanced scores: the minority is over-predicted
    assert found[0].recall[1] > found[-1].recall[1]
    assert found[0].precision[1] < found[-1].precision[1]


def test_one_record_moves_the_counts_by_at_most_the_sensitivity() -> None:
    # the Gaussian mechanism's noise is scaled to this bound, so it must hold for
    # any record, whatever the candidates predict for it
    logits, labels = _toy(n=60)
    biases = calibration.candidate_biases([0.7, 0.2, 0.1][:2], calibration.STRENGTHS)
    full = calibration.counts(logits, labels, biases)
    bound = calibration.sensitivity(len(biases))
    assert bound == math.sqrt(11)
    worst = max(np.linalg.norm(full - calibration.counts(
        np.delete(logits, i, 0), np.delete(labels, i), biases)) for i in range(60))
    assert worst <= bound + 1e-12
    assert worst == pytest.approx(bound)  # a record every candidate gets right


def test_noise_has_the_planned_scale_and_zero_means_exact() -> None:
    exact = np.zeros((11, 3))
    rng = np.random.default_rng(1)
    draws = np.stack([calibration.noisy(exact, z=2.0, rng=rng, candidates=5,
                                        num_classes=3) for _ in range(400)])
    assert draws.std() == pytest.approx(2.0 * math.sqrt(11), rel=0.05)
    assert (calibration.noisy(exact + 3, z=0.0, rng=rng, candidates=5,
                              num_classes=3) == 3).all()
    # two classes: the histogram's sensitivity 1, so z itself
    hist = np.stack([calibration.noisy(np.zeros((2, 6)), z=2.0, rng=rng,
                                       candidates=5, num_classes=2)
                     for _ in range(800)])
    assert hist.std() == pytest.approx(2.0, rel=0.05)


def test_the_two_class_histogram_gives_every_candidates_exact_counts() -> None:
    # Prepare: equal thresholds too (a uniform prior: every bias 0)
    logits, labels = _toy(5, 300)
    for prior in ([0.85, 0.15], [0.5, 0.5], [0.2, 0.8]):
        biases = calibration.candidate_biases(prior, calibration.STRENGTHS)
        # Execute
        hist = calibration.histogram(logits, labels, biases)
        # Assert: the counts layout, equal to scoring each candidate directly
        np.testing.assert_array_equal(calibration.from_histogram(hist, biases),
                                      calibration.counts(logits, labels, biases))
        assert hist.sum() == len(labels)


def test_one_record_moves_the_histogram_by_exactly_one_cell() -> None:
    logits, labels = _toy(6, 80)
    biases = calibration.candidate_biases([0.85, 0.15], calibration.STRENGTHS)
    full = calibration.released(logits, labels, biases)
    assert full.shape == (2, 6) == calibration.release_shape(5, 2)
    assert calibration.sensitivity(5, 2) == 1.0
    for i in range(80):
        less = calibration.released(np.delete(logits, i, 0), np.delete(labels, i),
                                    biases)
        diff = full - less
        assert np.count_nonzero(diff) == 1 and diff.sum() == 1.0


def test_the_excess_is_false_positives_minus_false_negatives() -> None:
    # Prepare
    logits, labels = _toy(3, 500)
    biases = calibration.candidate_biases([0.85, 0.15], calibration.STRENGTHS)
    counts = calibration.to_counts(calibration.histogram(logits, labels, biases),
                                   biases)
    # Execute
    over = calibration.excess(counts, 1)
    # Assert: scored by hand; it falls as the strength grows (fewer minority calls)
    for k, bias in enumerate(biases):
        pred = np.argmax(logits + bias, 1)
        fp = int(((pred == 1) & (labels == 0)).sum())
        fn = int(((pred == 0) & (labels == 1)).sum())
        assert over[k] == fp - fn
    assert list(over) == sorted(over, reverse=True)


def test_the_balance_point_is_where_precision_meets_recall() -> None:
    # Prepare: excesses by hand (rows: N, then TP and P per candidate; class 1)
    def counts(predicted: list[float], n: float = 100.0) -> np.ndarray:
        out = np.zeros((1 + 2 * len(predicted), 2))
        out[0, 1] = n
        out[2::2, 1] = predicted
        return out

    # Execute / Assert: the zero of the fitted line, clipped to the candidates
    assert calibration.balance_point(counts([140, 120, 101, 80, 60]), 1) == 2
    assert calibration.balance_point(counts([130, 125, 120, 115, 110]), 1) == 4
    assert calibration.balance_point(counts([99, 90, 80, 70, 60]), 1) == 0
    # a line that does not fall (noise): the smallest excess
    assert calibration.balance_point(counts([90, 130, 95, 140, 120]), 1) == 2
    # exact on a toy head: the chosen candidate's precision and recall are closest
    logits, labels = _toy(4, 4000)
    biases = calibration.candidate_biases([0.85, 0.15], calibration.STRENGTHS)
    exact = calibration.to_counts(calibration.histogram(logits, labels, biases),
                                  biases)
    found = calibration.estimates(exact, calibration.STRENGTHS)
    gaps = [abs(e.precision[1] - e.recall[1]) for e in found]
    assert abs(calibration.balance_point(exact, 1) - int(np.argmin(gaps))) <= 1


def test_the_choice_survives_dp_noise_on_a_federation_of_sites() -> None:
    # Prepare: 8 sites of 150 validation records, each releasing noisy counts
    biases = calibration.candidate_biases([0.85, 0.15], calibration.STRENGTHS)
    rng = np.random.default_rng(2)
    total = np.zeros((11, 2))
    exact_total = np.zeros((11, 2))
    for seed in range(8):
        exact = calibration.counts(*_toy(seed, 150), biases)
        exact_total += exact
        total += calibration.noisy(exact, z=2.0, rng=rng, candidates=5,
                                   num_classes=3)  # the counts' (many-class) noise
    # Execute
    noisy_pick = calibration.choose(calibration.estimates(total,
                                                          calibration.STRENGTHS))
    exact_found = calibration.estimates(exact_total, calibration.STRENGTHS)
    # Assert: the noisy choice is within 0.02 macro-F1 of the exact best
    best = max(e.macro_f1 for e in exact_found)
    picked = next(e for e in exact_found if e.strength == noisy_pick.strength)
    assert best - picked.macro_f1 < 0.02
    assert calibration.choose(exact_found).strength > 0  # balanced overshoots


def test_the_balance_point_survives_the_histograms_noise() -> None:
    # Prepare: 10 sites of 100 validation records (15 % minority), each releasing
    # its histogram with the two-class noise (z = 1), over 200 federations
    biases = calibration.candidate_biases([0.85, 0.15], calibration.STRENGTHS)
    rng = np.random.default_rng(5)
    exact = sum(calibration.histogram(*_toy(seed, 100), biases) for seed in range(10))
    truth = calibration.balance_point(calibration.to_counts(exact, biases), 1)
    # Execute
    picks = [calibration.balance_point(calibration.to_counts(
        exact + sum(calibration.noisy(np.zeros((2, 6)), z=1.0, rng=rng, candidates=5,
                                      num_classes=2) for _ in range(10)),
        biases), 1) for _ in range(200)]
    # Assert: nearly always the exact pick or its neighbour, never the far end
    near = sum(abs(p - truth) <= 1 for p in picks) / len(picks)
    assert near >= 0.95, (truth, np.bincount(picks, minlength=5))


def test_negative_noisy_counts_and_absent_classes_stay_sane() -> None:
    total = np.array([[50.0, -3.0], *itertools.repeat([40.0, -2.0], 1),
                      *itertools.repeat([60.0, -5.0], 1)])
    (est,) = calibration.estimates(total, [0.0])
    assert est.macro_f1 == pytest.approx(2 * 40 / (60 + 50))  # class 1 left out
    assert 0.0 <= min(est.precision + est.recall + est.f1)


def test_smoothing_averages_neighbours_and_keeps_a_clear_peak() -> None:
    found = [calibration.Estimate(s, f, [], [], []) for s, f in
             zip(calibration.STRENGTHS, (0.6, 0.9, 0.62, 0.64, 0.66), strict=True)]
    # a lone spike (noise) is damped towards its neighbours
    assert calibration.smoothed(found)[1] == pytest.approx((0.6 + 1.8 + 0.62) / 4)
    assert calibration.smoothed(found)[0] == pytest.approx((0.9 + 1.2 + 0.9) / 4)
    clear = [calibration.Estimate(s, f, [], [], []) for s, f in
             zip(calibration.STRENGTHS, (0.5, 0.6, 0.8, 0.6, 0.5), strict=True)]
    assert calibration.choose(clear).strength == 0.5


def test_a_gain_the_noise_could_explain_keeps_the_trained_rule() -> None:
    found = [calibration.Estimate(s, f, [], [], []) for s, f in
             zip(calibration.STRENGTHS, (0.80, 0.82, 0.84, 0.83, 0.81), strict=True)]
    assert calibration.choose(found).strength == 0.5
    assert calibration.choose(found, margin=0.05).strength == 0.0
    # the delta method's figure is the noise's effect on the estimate, or a little
    # more (it ignores the clipping of the counts): a conservative margin
    logits, labels = _toy(3, 1200)
    biases = calibration.candidate_biases([0.85, 0.15], calibration.STRENGTHS)
    exact = calibration.counts(logits, labels, biases)
    rng = np.random.default_rng(4)
    draws = [calibration.estimates(exact + rng.normal(0, 20.0, exact.shape),
                                   calibration.STRENGTHS)[0].macro_f1
             for _ in range(400)]
    sd = calibration.macro_f1_sd(exact, 0, noise_sd=20.0)
    assert 0.9 * float(np.std(draws)) <= sd <= 1.5 * float(np.std(draws))


def test_a_class_of_a_few_noisy_records_does_not_blow_up_the_margin() -> None:
    total = np.array([[500.0, 1.2], [450.0, 0.1], [480.0, -0.5]])
    sd = calibration.macro_f1_sd(total, 0, noise_sd=20.0)
    assert sd <= 0.5 * math.sqrt(2) / 2 + 1e-12  # two classes, each at most 0.5

