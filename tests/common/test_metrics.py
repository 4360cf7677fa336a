"""Classification metrics and collapse detection, against hand-computed values."""

from __future__ import annotations

import pytest

from fedtune.common import metrics


def test_per_class_precision_recall_f1() -> None:
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    assert metrics.per_class_precision(y_true, y_pred, num_classes=3) == [
        0.5, 2 / 3, 0.0]
    assert metrics.per_class_recall(y_true, y_pred, num_classes=3) == [0.5, 1.0, 0.0]
    assert metrics.per_class_f1(y_true, y_pred, num_classes=3) == pytest.approx(
        [0.5, 0.8, 0.0])
    assert metrics.macro_f1(y_true, y_pred, num_classes=3) == pytest.approx(1.3 / 3)


def test_collapse_is_detected() -> None:
    y_true = [0] * 60 + [1] * 30 + [2] * 10
    spread = metrics.prediction_spread(y_true, [0] * 97 + [1] * 3, num_classes=3)
    assert spread == {"top_prediction": 0.0, "top_prediction_share": 0.97,
                      "classes_never_predicted": 1.0, "collapsed": 1.0}
    healthy = metrics.prediction_spread(y_true, y_true, num_classes=3)
    assert healthy["collapsed"] == 0.0 and healthy["classes_never_predicted"] == 0.0
    # one class in the truth: predicting it is no collapse
    assert metrics.prediction_spread([1] * 5, [1] * 5, num_classes=2)[
        "collapsed"] == 0.0


def test_a_weak_model_on_a_skewed_task_is_not_called_collapsed() -> None:
    # 90 % majority in the truth: predicting it for 96 % of the records still
    # finds the minority (4 % of 10 %); 99.5 % is the collapse
    truth = [0] * 900 + [1] * 100
    weak = [0] * 900 + [1] * 40 + [0] * 60
    dead = [0] * 995 + [1] * 5
    assert metrics.prediction_spread(truth, weak, num_classes=2)["collapsed"] == 0.0
    assert metrics.prediction_spread(truth, dead, num_classes=2)["collapsed"] == 1.0


def test_paired_bootstrap_interval_of_a_macro_f1_difference() -> None:
    truth = [i % 3 for i in range(300)]
    good = list(truth)
    worse = [t if i % 4 else (t + 1) % 3 for i, t in enumerate(truth)]  # 25 % wrong
    diff, lo, hi = metrics.paired_bootstrap_macro_f1(truth, good, worse,
                                                     num_classes=3, resamples=500)
    assert diff == pytest.approx(1.0 - metrics.macro_f1(truth, worse, num_classes=3))
    assert 0 < lo < diff < hi  # clearly better: the whole interval above zero
    back = metrics.paired_bootstrap_macro_f1(truth, worse, good, num_classes=3,
                                             resamples=500)
    assert back == pytest.approx((-diff, -hi, -lo), abs=0.02)
    assert metrics.paired_bootstrap_macro_f1(truth, worse, worse, num_classes=3,
                                             resamples=200) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="300 labels but 299 and 300"):
        metrics.paired_bootstrap_macro_f1(truth, good[:-1], good, num_classes=3)
