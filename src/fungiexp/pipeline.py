"""tf.data input pipelines and Keras augmentation layers.

Images are decoded and resized once, cached in memory as uint8, then
shuffled, batched and (for training only) augmented. Pixels leave the
pipeline as float32 in [0, 255]: scaling belongs to the model, which starts
with its own preprocessing layer.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from fungiexp.images import ImageRecord, read_rgb
from fungiexp.validate import check_augmentation

AUTOTUNE = tf.data.AUTOTUNE


def graph_function(function):
    """Mark a function for tf.data as plain TensorFlow code that AutoGraph leaves alone.

    AutoGraph converts a function by reading its source file again when a
    dataset is first iterated. If that file was edited since the process
    started (a long run going while the user works on the code), it reads
    the wrong lines and fails or converts another function. These functions
    have no Python control flow, so they need no conversion.
    """
    return tf.autograph.experimental.do_not_convert(function)


def load_image(path: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Decode an image file of any mode and size as uint8 RGB resized to ``image_size``.

    Decoding goes through Pillow (``images.read_rgb``), which reads more
    formats and modes than TensorFlow's decoders (TIFF, CMYK, 16-bit).
    """
    image = tf.numpy_function(lambda file: read_rgb(file.decode(), image_size), [path], tf.uint8, stateful=False)
    image.set_shape((*image_size, 3))
    return image


def make_dataset(
    records: list[ImageRecord],
    root: Path,
    image_size: tuple[int, int],
    batch_size: int,
    *,
    training: bool,
    augmenter: keras.Sequential | None = None,
    seed: int = 0,
    epoch: tf.Variable | None = None,
    cache_file: str | None = None,
) -> tf.data.Dataset:
    """Build the batched dataset of (image, label) pairs for one split.

    Args:
        records: Images of the split.
        root: Folder that the record paths are relative to.
        image_size: (height, width) in pixels.
        batch_size: Images per batch.
        training: Shuffle every epoch and apply ``augmenter``; validation and
            test sets pass False and keep file order.
        augmenter: Keras preprocessing layers applied to training batches.
        seed: Seed of the shuffle order.
        epoch: Variable holding the current epoch (0-based). The shuffle
            order of a training pass depends only on ``seed`` and this value,
            so a resumed run shuffles its remaining epochs as an
            uninterrupted run would. None shuffles every pass anew.
        cache_file: File prefix under which the decoded images are cached
            on disk; None keeps them in memory.

    Returns:
        A dataset of float32 images in [0, 255] with shape (batch, h, w, 3)
        and int32 labels.
    """
    paths = [str(root / record.path) for record in records]
    labels = np.array([record.label for record in records], dtype=np.int32)
    size = tuple(int(side) for side in image_size)

    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    dataset = dataset.map(graph_function(lambda path, label: (load_image(path, size), label)), num_parallel_calls=AUTOTUNE)
    # Decoding and resizing happen once; later epochs read the cache.
    dataset = dataset.cache(cache_file or "")
    if training and epoch is not None:
        cached = dataset
        dataset = tf.data.Dataset.from_tensors(0).flat_map(
            graph_function(
                lambda _: cached.shuffle(len(records), seed=seed * 100_003 + epoch.read_value(), reshuffle_each_iteration=False)
            )
        )
        # flat_map hides the size, which Keras needs to count the steps of an epoch.
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(records)))
    elif training:
        dataset = dataset.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    dataset = dataset.map(graph_function(lambda images, labels: (tf.cast(images, tf.float32), labels)), num_parallel_calls=AUTOTUNE)
    if training and augmenter is not None:
        dataset = dataset.map(
            graph_function(lambda images, labels: (augmenter(images, training=True), labels)),
            num_parallel_calls=AUTOTUNE,
        )
    return dataset.prefetch(AUTOTUNE)


class RandomRot90(keras.layers.Layer):
    """Rotate each image by a random multiple of 90 degrees (square images only)."""

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        turns = keras.random.randint((tf.shape(images)[0],), 0, 4, seed=self.generator)
        return tf.map_fn(
            lambda pair: tf.image.rot90(pair[0], k=pair[1]),
            (images, turns),
            fn_output_signature=images.dtype,
        )

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def affine_transforms(angle, scale, shift_y, shift_x, height, width) -> tf.Tensor:
    """Return one projective transform per image (rows of 8, as ImageProjectiveTransformV3 reads them).

    Each maps an output pixel to the input pixel it samples: the output is
    the input rotated by ``angle`` radians and scaled by 1 / ``scale`` about
    the image centre, then moved by ``shift_x`` and ``shift_y`` pixels.
    Arguments other than ``height`` and ``width`` are float32 vectors with one
    value per image.
    """
    # input = A (output - centre) + centre - shift, with A = rotation x zoom.
    cos = tf.cos(angle) * scale
    sin = tf.sin(angle) * scale
    centre_x = (width - 1.0) / 2.0
    centre_y = (height - 1.0) / 2.0
    offset_x = centre_x - cos * centre_x + sin * centre_y - shift_x
    offset_y = centre_y - sin * centre_x - cos * centre_y - shift_y
    zeros = tf.zeros_like(cos)
    return tf.stack([cos, -sin, offset_x, sin, cos, offset_y, zeros, zeros], axis=1)


class RandomAffine(keras.layers.Layer):
    """Rotate, shift and zoom each image by random amounts in one resampling pass.

    Keras's RandomRotation, RandomTranslation and RandomZoom each resample
    the whole batch, so applying all three costs three passes. This layer
    draws from the same ranges as those layers and composes one transform
    about the image centre. The ranges: a rotation of up to ``rotation`` of a
    full turn either way, shifts of up to ``height_shift`` and
    ``width_shift`` of the image size, and a zoom factor in 1 +/- ``zoom``.
    """

    def __init__(
        self,
        rotation: float = 0.0,
        height_shift: float = 0.0,
        width_shift: float = 0.0,
        zoom: float = 0.0,
        fill_mode: str = "reflect",
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.rotation = rotation
        self.height_shift = height_shift
        self.width_shift = width_shift
        self.zoom = zoom
        self.fill_mode = fill_mode
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        shape = tf.shape(images)
        count = shape[0]
        height = tf.cast(shape[1], tf.float32)
        width = tf.cast(shape[2], tf.float32)

        def uniform(limit):
            return keras.random.uniform((count,), -limit, limit, seed=self.generator)

        angle = uniform(self.rotation * 2.0 * np.pi)
        scale = 1.0 + uniform(self.zoom)
        shift_y = uniform(self.height_shift) * height
        shift_x = uniform(self.width_shift) * width
        transforms = affine_transforms(angle, scale, shift_y, shift_x, height, width)
        return keras.ops.image.affine_transform(images, transforms, interpolation="bilinear", fill_mode=self.fill_mode)

    def get_config(self):
        return {
            **super().get_config(),
            "rotation": self.rotation,
            "height_shift": self.height_shift,
            "width_shift": self.width_shift,
            "zoom": self.zoom,
            "fill_mode": self.fill_mode,
            "seed": self.seed,
        }


def augmentation_generators(augmenter: keras.Sequential | None) -> list[keras.random.SeedGenerator]:
    """Return the seed generators of the augmentation layers, whose state a checkpoint keeps."""
    if augmenter is None:
        return []
    return [layer.generator for layer in augmenter.layers if isinstance(getattr(layer, "generator", None), keras.random.SeedGenerator)]


def build_augmenter(aug_cfg: DictConfig, image_size: tuple[int, int], seed: int) -> keras.Sequential | None:
    """Build the Keras preprocessing layers that ``augmentation`` describes.

    Returns None when every transform is off. Layers work on float images in
    [0, 255].

    Raises:
        ConfigError: For a negative strength, an unknown fill mode, or 90-degree
            rotations of non-square images.
    """
    check_augmentation(aug_cfg, image_size)
    fill_mode = str(aug_cfg.fill_mode)

    layers: list[keras.layers.Layer] = []
    flip = {
        (True, True): "horizontal_and_vertical",
        (True, False): "horizontal",
        (False, True): "vertical",
    }.get((bool(aug_cfg.horizontal_flip), bool(aug_cfg.vertical_flip)))
    if flip:
        layers.append(keras.layers.RandomFlip(flip, seed=seed))
    if aug_cfg.rot90:
        layers.append(RandomRot90(seed=seed + 1))
    if aug_cfg.rotation_degrees > 0 or aug_cfg.width_shift > 0 or aug_cfg.height_shift > 0 or aug_cfg.zoom > 0:
        layers.append(
            RandomAffine(
                rotation=float(aug_cfg.rotation_degrees) / 360.0,
                height_shift=float(aug_cfg.height_shift),
                width_shift=float(aug_cfg.width_shift),
                zoom=float(aug_cfg.zoom),
                fill_mode=fill_mode,
                seed=seed + 2,
            )
        )
    if aug_cfg.brightness > 0:
        layers.append(keras.layers.RandomBrightness(float(aug_cfg.brightness), value_range=(0.0, 255.0), seed=seed + 5))
    if aug_cfg.contrast > 0:
        layers.append(keras.layers.RandomContrast(float(aug_cfg.contrast), value_range=(0.0, 255.0), seed=seed + 6))
    if not layers:
        return None
    return keras.Sequential(layers, name="augmentation")

