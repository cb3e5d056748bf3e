"""Test-set metrics."""

from __future__ import annotations

import numpy as np
import pytest

from fungiexp import evaluate
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


def _grouped_predictions(groups: int, patches: int, seed: int):
    """Labels and predictions of ``groups`` source images of ``patches`` patches, about 70% right."""
    rng = np.random.default_rng(seed)
    y_true = np.repeat(np.arange(groups) % 3, patches)
    wrong = rng.random(groups * patches) < 0.3
    y_pred = np.where(wrong, (y_true + 1) % 3, y_true)
    names = [f"img{index // patches}" for index in range(groups * patches)]
    return y_true, y_pred, names


def test_bootstrap_contains_estimate_and_shrinks():
    codes = ["H1", "H2", "H3"]
    widths = []
    for groups in (12, 120):
        y_true, y_pred, names = _grouped_predictions(groups, patches=5, seed=groups)
        point = evaluate.evaluate_predictions(y_true, np.eye(3)[y_pred], codes)
        intervals = evaluate.bootstrap_intervals(y_true, y_pred, names, codes, resamples=2000, seed=0)
        for name in ("accuracy", "balanced_accuracy", "macro_f1"):
            low, high = intervals[name]
            assert low <= point[name] <= high, (groups, name)
        for code in codes:
            low, high = intervals[f"{code}/recall"]
            assert low <= point["per_class"][code]["recall"] <= high
        widths.append(intervals["accuracy"][1] - intervals["accuracy"][0])
    assert widths[1] < widths[0] / 2


def test_bootstrap_resamples_whole_groups_not_patches():
    # Each source image is all right or all wrong: resampling patches would
    # make the interval far too narrow; resampling images keeps it wide.
    codes = ["H1", "H2"]
    y_true = np.repeat([0, 1] * 5, 20)
    right = np.repeat([True, False] * 2 + [True] * 6, 20)
    y_pred = np.where(right, y_true, 1 - y_true)
    grouped = evaluate.bootstrap_intervals(y_true, y_pred, [str(i // 20) for i in range(200)], codes, resamples=2000, seed=1)
    by_patch = evaluate.bootstrap_intervals(y_true, y_pred, [str(i) for i in range(200)], codes, resamples=2000, seed=1)
    width = lambda bounds: bounds[1] - bounds[0]  # noqa: E731
    assert width(grouped["accuracy"]) > 3 * width(by_patch["accuracy"])


def test_bootstrap_is_reproducible_from_its_seed():
    y_true, y_pred, names = _grouped_predictions(20, patches=3, seed=3)
    first = evaluate.bootstrap_intervals(y_true, y_pred, names, ["H1", "H2", "H3"], resamples=200, seed=7)
    again = evaluate.bootstrap_intervals(y_true, y_pred, names, ["H1", "H2", "H3"], resamples=200, seed=7)
    assert first == again


def test_offsets_recover_underpredicted_class():
    rng = np.random.default_rng(0)
    y_true = np.repeat([0, 1, 2], 50)
    probabilities = np.full((150, 3), 0.1)
    probabilities[np.arange(150), y_true] = 0.5
    # Class 2 is scored just below class 0, so it is never predicted until its offset rises.
    probabilities[y_true == 2, 0] = 0.55
    probabilities += rng.uniform(0, 0.02, probabilities.shape)
    before = macro_f1(y_true, probabilities, 3)

    offsets = evaluate.tune_class_offsets(y_true, probabilities, 3)
    after = macro_f1(y_true, evaluate.apply_class_offsets(probabilities, offsets), 3)

    assert before < 0.7
    assert after > 0.95
    assert offsets[2] > offsets[0]


def test_offsets_stay_zero_without_gain():
    y_true = np.array([0, 1, 2, 0, 1, 2])
    offsets = evaluate.tune_class_offsets(y_true, one_hot(y_true, 3) * 0.8 + 0.05, 3)
    assert np.all(offsets == 0)


def test_applied_offsets_keep_rows_normalised():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    shifted = evaluate.apply_class_offsets(probabilities, [0.0, 2.0, 0.0])
    assert np.allclose(shifted.sum(axis=1), 1.0)
    assert np.argmax(shifted[0]) == 1
    assert np.allclose(evaluate.apply_class_offsets(probabilities, [0.0, 0.0, 0.0]), probabilities)


def _summary_result(scoring):
    from types import SimpleNamespace

    true = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    test = evaluate_predictions(true, probabilities, ["H1", "H2"])
    test["scoring"] = scoring
    infos = [SimpleNamespace(code="H1", display_name="H1 (one)"), SimpleNamespace(code="H2", display_name="H2 (two)")]
    return {"test": test, "class_infos": infos, "val_macro_f1": 0.5, "run_id": "abc", "experiment_id": "1", "tracking_uri": "sqlite:///mlruns/mlflow.db"}


def test_summary_names_views_and_offsets():
    from fungiexp.summary import format_summary

    with_both = format_summary(
        _summary_result({"tta_views": "flips", "view_count": 4, "class_offsets": True, "macro_f1_without_offsets": 0.61234})
    )
    assert "Scored with the mean of 4 test-time views (evaluation.tta_views=flips)" in with_both
    assert "class offsets chosen on validation (test macro F1 without them: 0.6123)" in with_both
    plain = format_summary(_summary_result({"tta_views": None, "view_count": 1, "class_offsets": False, "macro_f1_without_offsets": None}))
    assert "Scored with one view per image (evaluation.tta=false) and no class offsets." in plain
    zero = format_summary(
        _summary_result({"tta_views": None, "view_count": 1, "class_offsets": True, "offsets_all_zero": True, "macro_f1_without_offsets": 0.5})
    )
    assert "class offsets tuned on validation, all zero (no prediction changed)" in zero
