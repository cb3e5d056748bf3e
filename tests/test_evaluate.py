"""Test-set metrics."""

from __future__ import annotations

import numpy as np
import pytest

from fungiexp.evaluate import evaluate_predictions, macro_f1


def one_hot(predictions, num_classes):
    return np.eye(num_classes)[predictions]


def test_never_predicted_class_scores_zero():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    probabilities = one_hot(np.array([0, 0, 1, 0, 0, 1]), 3)
    result = evaluate_predictions(y_true, probabilities, ["H1", "H2", "H3"])
    assert result["per_class"]["H3"]["precision"] == 0.0
    assert result["per_class"]["H3"]["recall"] == 0.0
    assert result["per_class"]["H1"]["support"] == 2
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["balanced_accuracy"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_confusion_counts_sum_to_test_size():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, size=40)
    probabilities = rng.dirichlet(np.ones(5), size=40)
    result = evaluate_predictions(y_true, probabilities, ["H1", "H2", "H3", "H5", "H6"])
    assert result["confusion"].sum() == 40
    assert result["confusion"].shape == (5, 5)
    assert result["macro_f1"] == pytest.approx(macro_f1(y_true, probabilities, 5))
