"""Figures of a run: confusion matrix and training curves.

Helpers build ``matplotlib.figure.Figure`` objects without pyplot, so they
need no display and leave no global state; the caller saves or logs them.
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def plot_confusion_matrix(confusion: np.ndarray, class_names: list[str], title: str) -> Figure:
    """Draw the confusion matrix as counts and as row-normalised fractions side by side.

    Rows are true classes and columns predicted classes, so the diagonal of
    the normalised panel is each class's recall.
    """
    figure = Figure(figsize=(6 + 1.6 * len(class_names), 2.5 + 0.6 * len(class_names)), layout="constrained")
    count_axes, fraction_axes = figure.subplots(1, 2)
    row_sums = confusion.sum(axis=1, keepdims=True)
    fractions = np.divide(confusion, row_sums, out=np.zeros(confusion.shape, dtype=float), where=row_sums > 0)
    _draw_matrix(count_axes, confusion, class_names, "Counts", "{:d}", figure)
    _draw_matrix(fraction_axes, fractions, class_names, "Fraction of true class", "{:.2f}", figure, vmax=1.0)
    figure.suptitle(title)
    return figure


def _draw_matrix(axes: Axes, values: np.ndarray, class_names, subtitle, cell_format, figure, vmax=None) -> None:
    image = axes.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, labels=class_names)
    axes.set_xlabel("Predicted class")
    axes.set_ylabel("True class")
    axes.set_title(subtitle)
    threshold = (vmax if vmax is not None else max(values.max(), 1)) / 2
    for row in range(values.shape[0]):
        for column in range(values.shape[1]):
            value = values[row, column]
            text = cell_format.format(int(value) if cell_format == "{:d}" else value)
            axes.text(column, row, text, ha="center", va="center", color="white" if value > threshold else "black")


def plot_curve(history: dict[str, list[float]], metric: str, title: str) -> Figure:
    """Plot a Keras history metric per epoch, training against validation."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
        values = history.get(key)
        if values:
            axes.plot(range(1, len(values) + 1), values, marker="o", label=label)
    axes.set_xlabel("Epoch")
    axes.set_ylabel(metric)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return figure
