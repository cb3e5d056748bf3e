"""Test-set metrics computed with scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)

# Run artifact with the class offsets chosen on the validation split, which predict applies too.
OFFSETS_ARTIFACT = "evaluation/class_offsets.json"

# Views of an image that evaluation.tta averages, by evaluation.tta_views.
# Each view is (transpose, axes): whether height and width of (batch, height,
# width, channels) are swapped first, then which axes are reversed. A slide
# has no orientation, so every view shows the same specimen. "flips" is the
# image as it is and flipped left-right, up-down and both. "dihedral" adds
# the transposes of those four: the two 90-degree rotations and the two
# diagonal mirrors, which need square images.
_FLIP_AXES = ((), (2,), (1,), (1, 2))
TTA_VIEWS = {
    "flips": tuple((False, axes) for axes in _FLIP_AXES),
    "dihedral": tuple((transpose, axes) for transpose in (False, True) for axes in _FLIP_AXES),
}


def tta_views(evaluation) -> str | None:
    """Return the name of the test-time views set in ``evaluation`` (config or dict), or None without test-time augmentation.

    Runs logged before evaluation.tta_views existed used the four flips.
    """
    if not evaluation.get("tta", False):
        return None
    return str(evaluation.get("tta_views", "flips"))


def evaluate_predictions(y_true: np.ndarray, probabilities: np.ndarray, class_codes: list[str]) -> dict:
    """Score predicted class probabilities against true labels.

    Classes that are never predicted get precision 0 (``zero_division=0``)
    rather than an error or a warning.

    Args:
        y_true: Integer labels, shape (n,).
        probabilities: Predicted probabilities, shape (n, n_classes).
        class_codes: Class codes in label order.

    Returns:
        A dict with accuracy, balanced_accuracy, macro and weighted
        precision/recall/F1, ``per_class`` (code -> precision, recall, f1,
        support), ``confusion`` (counts, rows are true classes) and
        ``report_text``.
    """
    labels = list(range(len(class_codes)))
    y_pred = np.argmax(probabilities, axis=1)
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=class_codes, zero_division=0, output_dict=True
    )
    text = classification_report(y_true, y_pred, labels=labels, target_names=class_codes, zero_division=0, digits=4)
    per_class = {
        code: {
            "precision": float(report[code]["precision"]),
            "recall": float(report[code]["recall"]),
            "f1": float(report[code]["f1-score"]),
            "support": int(report[code]["support"]),
        }
        for code in class_codes
    }
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "macro_precision": float(report["macro avg"]["precision"]),
        "macro_recall": float(report["macro avg"]["recall"]),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "weighted_precision": float(report["weighted avg"]["precision"]),
        "weighted_recall": float(report["weighted avg"]["recall"]),
        "weighted_f1": float(report["weighted avg"]["f1-score"]),
        "per_class": per_class,
        "confusion": confusion_matrix(y_true, y_pred, labels=labels),
        "report_text": text,
    }


def macro_f1(y_true: np.ndarray, probabilities: np.ndarray, num_classes: int) -> float:
    """Return the macro-averaged F1 of the argmax predictions."""
    y_pred = np.argmax(probabilities, axis=1)
    return float(f1_score(y_true, y_pred, labels=list(range(num_classes)), average="macro", zero_division=0))


def tune_class_offsets(
    y_true: np.ndarray, probabilities: np.ndarray, num_classes: int, max_abs: float = 1.5, steps: int = 31, rounds: int = 3
) -> np.ndarray:
    """Return one offset per class, added to the log-probabilities, that raises the macro-F1 on these labels.

    Call it with the validation split only. Coordinate ascent over an even
    grid from -``max_abs`` to ``max_abs``: each round tries every grid value
    for each class in turn and keeps a value only when it raises macro-F1,
    so offsets that gain nothing stay at zero. Moving the decision
    boundaries this way corrects a model that under-predicts a class, which
    class weights during training do not always achieve.
    """
    # Rounded, so that logs and the JSON file show 0.1 rather than 0.10000000000000009.
    grid = np.round(np.linspace(-max_abs, max_abs, steps), 6)
    offsets = np.zeros(num_classes)
    best = macro_f1(y_true, probabilities, num_classes)
    for _ in range(rounds):
        improved = False
        for label in range(num_classes):
            for value in grid:
                trial = offsets.copy()
                trial[label] = value
                score = macro_f1(y_true, apply_class_offsets(probabilities, trial), num_classes)
                if score > best + 1e-12:
                    best, offsets, improved = score, trial, True
        if not improved:
            break
    return offsets


def apply_class_offsets(probabilities: np.ndarray, offsets) -> np.ndarray:
    """Return ``probabilities`` with ``offsets`` added to their logarithms, normalised again."""
    scores = np.log(np.clip(probabilities, 1e-12, None)) + np.asarray(offsets, dtype=float)
    scores -= scores.max(axis=1, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(axis=1, keepdims=True)


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    # The mean recall over the classes present in y_true, computed directly
    # because balanced_accuracy_score warns when y_pred contains other classes.
    recalls = [np.mean(y_pred[y_true == label] == label) for label in np.unique(y_true)]
    return float(np.mean(recalls)) if recalls else float("nan")


def group_scores(records, probabilities: np.ndarray, num_classes: int, level: str) -> dict:
    """Score predictions per group (``source_image`` or ``sample``) by the mean of patch probabilities.

    A diagnosis is made per sample, not per patch, so this is the score that
    matters at the microscope. Each group's label is its most common patch label.

    Returns:
        ``accuracy``, ``macro_f1`` and ``count`` (number of groups).
    """
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(getattr(record, level), []).append(index)
    mean_probabilities = np.stack([probabilities[indices].mean(axis=0) for indices in groups.values()])
    labels = np.array([np.bincount([records[i].label for i in indices]).argmax() for indices in groups.values()])
    predictions = mean_probabilities.argmax(axis=1)
    return {
        "accuracy": float(np.mean(predictions == labels)),
        "macro_f1": float(f1_score(labels, predictions, labels=list(range(num_classes)), average="macro", zero_division=0)),
        "count": len(groups),
    }


def bootstrap_intervals(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: list[str],
    class_codes: list[str],
    resamples: int,
    seed: int,
    confidence: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals that resample whole groups (source images), not patches.

    Patches of one microscope image are not independent: resampling them one
    by one would give intervals that are too narrow. Each resample draws as
    many groups as there are, with replacement, and scores all their patches.

    Args:
        y_true: Integer labels, shape (n,).
        y_pred: Predicted labels, shape (n,).
        groups: Group of each patch (for example its source image), length n.
        class_codes: Class codes in label order.
        resamples: Number of bootstrap resamples.
        seed: Seed of the resampling.
        confidence: Coverage of the intervals, for example 0.95.

    Returns:
        For ``accuracy``, ``balanced_accuracy``, ``macro_f1`` and
        ``<code>/recall`` of each class: (low, high).
    """
    k = len(class_codes)
    names, group_index = np.unique(np.asarray(groups), return_inverse=True)
    # One confusion matrix per group, flattened: the resampled confusion matrix
    # is then a weighted sum of them, with the draw counts as weights.
    per_group = np.zeros((len(names), k * k))
    np.add.at(per_group, (group_index, np.asarray(y_true) * k + np.asarray(y_pred)), 1)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(names), np.full(len(names), 1.0 / len(names)), size=resamples)
    confusion = (counts @ per_group).reshape(resamples, k, k)

    true_totals = confusion.sum(axis=2)
    predicted_totals = confusion.sum(axis=1)
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = hits / true_totals
        precision = np.where(predicted_totals > 0, hits / predicted_totals, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = true_totals > 0
    # A class that a resample happens to leave out has an undefined recall.
    # It is left out of that resample's balanced accuracy (as in
    # scikit-learn) and of that class's interval.
    scores = {
        "accuracy": hits.sum(axis=1) / confusion.sum(axis=(1, 2)),
        "balanced_accuracy": np.nanmean(np.where(present, recall, np.nan), axis=1),
        # As in evaluate_predictions, every class counts, with F1 0 where undefined.
        "macro_f1": f1.mean(axis=1),
    }
    for index, code in enumerate(class_codes):
        scores[f"{code}/recall"] = recall[present[:, index], index]
    tail = (1.0 - confidence) / 2.0 * 100.0
    return {
        name: (float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))) if len(values) else (float("nan"), float("nan"))
        for name, values in scores.items()
    }
