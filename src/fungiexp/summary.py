"""Plain-text summary printed at the end of `fungiexp train`."""

from __future__ import annotations

from fungiexp.tracking import ui_command


def format_summary(result: dict) -> str:
    """Format test metrics, the per-class report and where the run is stored."""
    test = result["test"]
    infos = result["class_infos"]
    support = sum(entry["support"] for entry in test["per_class"].values())
    width = max(len(info.display_name) for info in infos)
    intervals = test.get("intervals", {})
    about = test.get("interval_info")
    lines = [f"Test results on {support} images"]
    if about:
        lines[0] += f" ({about['confidence']:.0%} intervals: bootstrap of {about['resamples']} resamples of whole source images)"
    for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1"), ("weighted_f1", "weighted F1")):
        lines.append(f"  {label:<17}  {test[key]:.4f}{_interval(intervals.get(key))}")
    lines += ["", f"  {'class':<{width}}  precision  recall      F1  support" + ("  recall interval" if intervals else "")]
    for info in infos:
        entry = test["per_class"][info.code]
        lines.append(
            f"  {info.display_name:<{width}}  {entry['precision']:9.4f}  {entry['recall']:6.4f}  "
            f"{entry['f1']:6.4f}  {entry['support']:7d}{_interval(intervals.get(f'{info.code}/recall'))}"
        )
    for level, scores in test.get("groups", {}).items():
        lines.append(
            f"  per {level.replace('_', ' ')} ({scores['count']} groups, mean of patch probabilities): "
            f"accuracy {scores['accuracy']:.4f}, macro F1 {scores['macro_f1']:.4f}"
        )
    scoring = test.get("scoring")
    if scoring:
        lines += ["", f"  Scored with {_scoring(scoring)}"]
    lines += [
        "",
        f"Validation macro F1 of the kept weights (scored like the test split, before class offsets): {result['val_macro_f1']:.4f}",
        f"MLflow run: {result['run_id']} (experiment id {result['experiment_id']})",
        f"Open the MLflow UI: {ui_command(result['tracking_uri'])}",
    ]
    return "\n".join(lines)


def _scoring(scoring: dict) -> str:
    """Say how the test probabilities were made: test-time views and class offsets."""
    if scoring["tta_views"]:
        views = f"the mean of {scoring['view_count']} test-time views (evaluation.tta_views={scoring['tta_views']})"
    else:
        views = "one view per image (evaluation.tta=false)"
    if scoring["class_offsets"] and scoring.get("offsets_all_zero"):
        offsets = "class offsets tuned on validation, all zero (no prediction changed)"
    elif scoring["class_offsets"]:
        offsets = f"class offsets chosen on validation (test macro F1 without them: {scoring['macro_f1_without_offsets']:.4f})"
    else:
        offsets = "no class offsets"
    return f"{views} and {offsets}."


def _interval(bounds) -> str:
    return f"  [{bounds[0]:.4f}, {bounds[1]:.4f}]" if bounds else ""
