"""Figures that show what a model learned: Grad-CAM heatmaps, augmentation previews, error galleries.

Every helper returns a ``matplotlib.figure.Figure`` built without pyplot; the
caller logs it.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf
from matplotlib import colormaps
from matplotlib.figure import Figure

log = logging.getLogger(__name__)


def layer_chain(model: keras.Model) -> list[keras.layers.Layer]:
    """Return the model's layers in order, with nested models (the VGG16 backbone) expanded.

    Both fungiexp models are plain chains without branches, which Grad-CAM
    relies on to run the forward pass layer by layer.
    """
    chain = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            chain.extend(layer_chain(layer))
        else:
            chain.append(layer)
    return chain


def grad_cam(model: keras.Model, images: np.ndarray, class_indices: np.ndarray) -> np.ndarray:
    """Compute Grad-CAM heatmaps for ``class_indices`` at the last convolution.

    Args:
        model: A fungiexp model (input: RGB pixels in [0, 255]).
        images: float32 array of shape (n, height, width, 3).
        class_indices: The class whose score each heatmap explains, shape (n,).

    Returns:
        Heatmaps in [0, 1] of shape (n, height, width).
    """
    chain = layer_chain(model)
    convolutions = [index for index, layer in enumerate(chain) if isinstance(layer, keras.layers.Conv2D) and layer.name != "preprocessing"]
    if not convolutions:
        raise ValueError(f"Model {model.name} has no convolution layer to explain.")
    last = convolutions[-1]
    inputs = tf.convert_to_tensor(images, dtype=tf.float32)
    with tf.GradientTape() as tape:
        x = inputs
        for layer in chain[: last + 1]:
            x = layer(x, training=False)
        features = x
        tape.watch(features)
        for layer in chain[last + 1 :]:
            x = layer(x, training=False)
        scores = tf.gather(x, tf.convert_to_tensor(class_indices), axis=1, batch_dims=1)
    gradients = tape.gradient(scores, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    cams = tf.image.resize(cams[..., tf.newaxis], images.shape[1:3])[..., 0].numpy()
    peaks = cams.reshape(len(cams), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(cams, peaks, out=np.zeros_like(cams), where=peaks > 0)


def gradcam_grid(
    model: keras.Model,
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
    per_class: int,
    title: str,
) -> Figure:
    """Draw, for each class, up to ``per_class`` test images with the Grad-CAM of the predicted class.

    Correct predictions fill the first half of each row and wrong ones the
    second half, where the data has them.
    """
    predictions = probabilities.argmax(axis=1)
    rows = []
    for label in range(len(class_names)):
        correct = np.flatnonzero((labels == label) & (predictions == label))
        wrong = np.flatnonzero((labels == label) & (predictions != label))
        half = per_class // 2
        chosen = list(correct[:half]) + list(wrong[: per_class - half])
        # Fill a row short of one kind with more of the other.
        for index in [*correct[half:], *wrong[per_class - half :]]:
            if len(chosen) >= per_class:
                break
            chosen.append(index)
        rows.append(chosen)

    figure = Figure(figsize=(2.2 * per_class, 2.4 * len(class_names)), layout="constrained")
    axes = figure.subplots(len(class_names), per_class, squeeze=False)
    chosen_all = [index for row in rows for index in row]
    heatmaps = grad_cam(model, images[chosen_all], predictions[chosen_all]) if chosen_all else []
    heat_of = dict(zip(chosen_all, heatmaps))
    jet = colormaps["jet"]
    for row_index, row in enumerate(rows):
        for column in range(per_class):
            ax = axes[row_index][column]
            ax.axis("off")
            if column >= len(row):
                continue
            index = row[column]
            ax.imshow(images[index].astype("uint8"))
            ax.imshow(jet(heat_of[index])[..., :3], alpha=0.4)
            verdict = "correct" if predictions[index] == labels[index] else f"as {class_names[predictions[index]].split()[0]}"
            ax.set_title(f"{verdict} ({probabilities[index, predictions[index]]:.2f})", fontsize=8)
        axes[row_index][0].text(
            -0.05, 0.5, class_names[row_index], transform=axes[row_index][0].transAxes, rotation=90, ha="right", va="center", fontsize=8
        )
    figure.suptitle(f"Grad-CAM of the predicted class, last convolution: {title}")
    return figure


def augmentation_preview(images: np.ndarray, augmenter, title: str, copies: int = 5) -> Figure:
    """Show each image next to ``copies`` random augmentations of it."""
    figure = Figure(figsize=(2 * (copies + 1), 2 * len(images)), layout="constrained")
    axes = figure.subplots(len(images), copies + 1, squeeze=False)
    for row, image in enumerate(images):
        batch = np.repeat(image[np.newaxis].astype("float32"), copies, axis=0)
        augmented = keras.ops.convert_to_numpy(augmenter(batch, training=True)) if augmenter is not None else batch
        for column, picture in enumerate([image, *augmented]):
            ax = axes[row][column]
            ax.imshow(np.clip(picture, 0, 255).astype("uint8"))
            ax.axis("off")
            if row == 0:
                ax.set_title("original" if column == 0 else f"augmented {column}", fontsize=8)
    figure.suptitle(f"Training augmentation: {title}")
    return figure


def error_gallery(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, paths: list[str], class_names: list[str], title: str, count: int = 12
) -> Figure:
    """Show the test images the model got wrong with the highest confidence."""
    predictions = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predictions != labels)
    order = wrong[np.argsort(-probabilities[wrong, predictions[wrong]])][:count]
    columns = 4
    rows = max(1, int(np.ceil(len(order) / columns)))
    figure = Figure(figsize=(3 * columns, 3.2 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, order):
        ax.imshow(images[index].astype("uint8"))
        ax.set_title(
            f"{paths[index].split('/')[-1]}\ntrue {class_names[labels[index]]}\n"
            f"predicted {class_names[predictions[index]]} ({probabilities[index, predictions[index]]:.2f})",
            fontsize=7,
        )
    if len(order) == 0:
        axes[0][0].text(0, 0.5, "No wrong predictions on the test split.")
    figure.suptitle(f"Most confident errors on the test split: {title}")
    return figure
