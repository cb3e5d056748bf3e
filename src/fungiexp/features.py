"""Frozen-feature cache: compute a model's frozen leading layers once per image.

The first part of a network may not train: VGG16 blocks 1 to 4 under
``fine_tune=block5``, or the whole backbone under ``fine_tune=frozen``. When
training images are not randomly augmented either, that part maps each
image to the same output in every epoch. Computing it once and training the
rest of the network on the stored outputs gives the same updates for a
fraction of the arithmetic.

The cache lives in memory when it fits ``trainer.feature_cache.memory_mb``,
otherwise in ``.npy`` files under ``trainer.feature_cache.dir``. A file is
named by a hash of everything that determines the features: the images and
their contents, the image size, and the frozen layers' configuration and
weights (which also covers the preprocessing and the choice of weights).
Runs of a sweep that share these reuse one cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from fungiexp.pipeline import graph_function

log = logging.getLogger(__name__)

# Prefix of the cache's file names, so that a clean-up can find them.
FILE_PREFIX = "features-"


@dataclass
class FrozenSplit:
    """A model cut into its frozen leading part and the trainable rest.

    ``suffix`` shares its layers (and so its weights) with the complete
    model: training it trains the complete model.
    """

    prefix: keras.Model
    suffix: keras.Model
    boundary: str


def split_frozen_prefix(model: keras.Model) -> FrozenSplit | None:
    """Cut ``model`` after its last leading layer without trainable weights.

    Works on a chain of layers, with at most one nested backbone (as the
    models of ``fungiexp.models`` are built). Returns None when nothing
    before the first trainable layer does enough work to be worth caching
    (only the input and preprocessing layers).
    """
    chain: list[keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            chain.extend(inner for inner in layer.layers if not isinstance(inner, keras.layers.InputLayer))
        else:
            chain.append(layer)
    first_trainable = next((index for index, layer in enumerate(chain) if layer.trainable_weights), len(chain))
    frozen = chain[:first_trainable]
    if not any(isinstance(layer, keras.layers.Conv2D) and layer.name != "preprocessing" for layer in frozen):
        return None
    if first_trainable == len(chain):
        return None

    images = keras.Input(shape=model.input_shape[1:], name="image")
    x = images
    for layer in frozen:
        x = layer(x, training=False) if isinstance(layer, keras.layers.BatchNormalization) else layer(x)
    prefix = keras.Model(images, x, name="frozen_prefix")

    features = keras.Input(shape=prefix.output_shape[1:], name="features")
    x = features
    for layer in chain[first_trainable:]:
        x = layer(x)
    suffix = keras.Model(features, x, name="trainable_suffix")
    return FrozenSplit(prefix, suffix, frozen[-1].name)


def cache_off_reason(cfg: DictConfig, augmenter, frozen: FrozenSplit | None) -> str | None:
    """Return why the cache cannot be used for this run, or None if it can."""
    if not cfg.trainer.feature_cache.enabled:
        return "trainer.feature_cache.enabled=false"
    if frozen is None:
        return f"model={cfg.model.name} with fine_tune={cfg.fine_tune.name} has no frozen leading layers to cache"
    if augmenter is not None:
        return (
            f"augmentation={cfg.augmentation.name} transforms training images randomly, so the frozen layers "
            "see a new image every epoch (augmentation=none allows the cache)"
        )
    if cfg.trainer.strategy != "default":
        return f"trainer.strategy={cfg.trainer.strategy} is not supported by the cache"
    return None


def cache_key(prefix: keras.Model, image_size, records, file_hashes: dict[str, str], dtype: str) -> str:
    """Return a hash of everything that determines the features of ``records``."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"size": list(image_size), "dtype": dtype, "keras": keras.__version__}).encode())
    for layer in prefix.layers:
        digest.update(json.dumps(layer.get_config(), sort_keys=True, default=str).encode())
    for weight in prefix.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    for record in records:
        digest.update(f"{record.path}\t{file_hashes.get(record.path, '')}\n".encode())
    return digest.hexdigest()[:32]


def features_for(
    prefix: keras.Model,
    dataset: tf.data.Dataset,
    count: int,
    key: str,
    settings: DictConfig,
    split: str,
    budget: dict,
) -> np.ndarray:
    """Return the features of one split: from memory, from the disk cache, or computed now.

    Args:
        prefix: The frozen leading layers.
        dataset: Batched, unaugmented, unshuffled (image, label) dataset of the split.
        count: Number of images in ``dataset``.
        key: ``cache_key`` of the split.
        settings: ``trainer.feature_cache``.
        split: Name of the split, for the log.
        budget: ``bytes``: memory the run's caches may still use; updated in
            place, and ``built`` or ``reused`` is appended to its ``actions`` list.

    Returns:
        An array of shape (count, ...), in memory or memory-mapped from disk.
    """
    dtype = np.dtype(str(settings.dtype))
    shape = (count, *prefix.output_shape[1:])
    size = int(np.prod(shape)) * dtype.itemsize
    folder = Path(str(settings.dir))
    path = folder / f"{FILE_PREFIX}{key}.npy"
    if path.is_file():
        stored = np.load(path, mmap_mode="r")
        if stored.shape == shape and stored.dtype == dtype:
            in_memory = size <= budget["bytes"]
            log.info(
                "Feature cache reused for the %s split: %s (%.0f MiB, %s)",
                split,
                path,
                size / 2**20,
                "loaded into memory" if in_memory else "read from disk",
            )
            budget.setdefault("actions", []).append("reused")
            if in_memory:
                budget["bytes"] -= size
                return np.array(stored)
            return stored
        log.warning("Feature cache %s has shape %s %s, expected %s %s; computing it again", path, stored.shape, stored.dtype, shape, dtype)

    in_memory = size <= budget["bytes"]
    started = time.perf_counter()
    log.info(
        "Building the feature cache for the %s split: %d images to %s of %s (%.0f MiB) %s",
        split,
        count,
        "x".join(str(side) for side in shape[1:]),
        dtype.name,
        size / 2**20,
        "in memory" if in_memory and not settings.persist else f"in {path}",
    )
    budget.setdefault("actions", []).append("built")
    if in_memory and not settings.persist:
        budget["bytes"] -= size
        features = _compute(prefix, dataset, np.empty(shape, dtype=dtype))
        log.info("Feature cache built for the %s split in %.0f s", split, time.perf_counter() - started)
        return features
    folder.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    target = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape)
    _compute(prefix, dataset, target)
    target.flush()
    del target
    # Renamed only when complete, so an interrupted build is never reused.
    os.replace(temporary, path)
    log.info("Feature cache built for the %s split in %.0f s", split, time.perf_counter() - started)
    if in_memory:
        budget["bytes"] -= size
        return np.load(path)
    return np.load(path, mmap_mode="r")


def _compute(prefix: keras.Model, dataset: tf.data.Dataset, target: np.ndarray) -> np.ndarray:
    start = 0
    for images, _ in dataset:
        output = keras.ops.convert_to_numpy(prefix(images, training=False))
        target[start : start + len(output)] = output.astype(target.dtype)
        start += len(output)
    if start != len(target):
        raise RuntimeError(f"The feature cache expected {len(target)} images and got {start}.")
    return target


def feature_dataset(
    features: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    training: bool,
    seed: int = 0,
    epoch: tf.Variable | None = None,
    one_hot: int = 0,
) -> tf.data.Dataset:
    """Build a batched dataset of (features, label) pairs from a cached array.

    Batches are gathered by index, so an array memory-mapped from disk is
    read batch by batch and never copied whole. The training order depends
    on ``seed`` and ``epoch`` exactly as in ``pipeline.make_dataset``.

    Args:
        one_hot: Number of classes to one-hot encode labels into; 0 keeps integer labels.
    """
    count = len(features)
    feature_shape = features.shape[1:]
    indices = tf.data.Dataset.range(count)
    if training and epoch is not None:
        ordered = indices
        indices = tf.data.Dataset.from_tensors(0).flat_map(
            graph_function(lambda _: ordered.shuffle(count, seed=seed * 100_003 + epoch.read_value(), reshuffle_each_iteration=False))
        )
        indices = indices.apply(tf.data.experimental.assert_cardinality(count))
    elif training:
        indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)

    labels = np.asarray(labels, dtype=np.int32)

    def gather(batch):
        return features[batch].astype(np.float32), labels[batch]

    def load(batch):
        values, batch_labels = tf.numpy_function(gather, [batch], (tf.float32, tf.int32), stateful=False)
        values.set_shape((None, *feature_shape))
        batch_labels.set_shape((None,))
        if one_hot:
            return values, tf.one_hot(batch_labels, one_hot)
        return values, batch_labels

    return indices.batch(batch_size).map(graph_function(load), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
