"""Input pipeline and augmentation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import compose_config
from fungiexp.errors import ConfigError
from fungiexp.images import scan_images
from fungiexp.pipeline import affine_transforms, build_augmenter, make_dataset


def augmentation(option, *extra):
    return compose_config([f"augmentation={option}", *extra]).augmentation


def test_none_builds_no_layers():
    assert build_augmenter(augmentation("none"), (32, 32), seed=0) is None


@pytest.mark.parametrize("option", ["notebook", "strong"])
def test_augmentation_keeps_shape_and_range(option):
    augmenter = build_augmenter(augmentation(option), (32, 32), seed=0)
    images = np.random.default_rng(0).uniform(0, 255, size=(4, 32, 32, 3)).astype("float32")
    output = np.asarray(augmenter(images, training=True))
    assert output.shape == images.shape
    assert output.min() >= -1e-3
    assert output.max() <= 255.0 + 1e-3
    assert not np.allclose(output, images)


def test_notebook_layers():
    augmenter = build_augmenter(augmentation("notebook"), (32, 32), seed=0)
    names = [type(layer).__name__ for layer in augmenter.layers]
    assert names == ["RandomFlip", "RandomAffine"]


def _transform(image, angle=0.0, scale=1.0, shift_y=0.0, shift_x=0.0):
    height, width = image.shape[:2]
    transforms = affine_transforms(
        tf.constant([angle]), tf.constant([scale]), tf.constant([shift_y]), tf.constant([shift_x]), float(height), float(width)
    )
    return np.asarray(keras.ops.image.affine_transform(image[None], transforms, interpolation="bilinear", fill_mode="constant"))[0]


def test_affine_identity_keeps_image():
    image = np.random.default_rng(0).uniform(0, 255, size=(9, 9, 3)).astype("float32")
    assert np.allclose(_transform(image), image, atol=1e-3)


def test_affine_quarter_turn_is_rot90():
    image = np.random.default_rng(1).uniform(0, 255, size=(9, 9, 3)).astype("float32")
    turned = _transform(image, angle=np.pi / 2)
    matches = [np.allclose(turned, np.rot90(image, k), atol=1e-2) for k in (1, 3)]
    assert any(matches)


def test_affine_shift_moves_content():
    image = np.zeros((9, 9, 1), dtype="float32")
    image[4, 4] = 100.0
    moved = _transform(image, shift_y=2.0, shift_x=-3.0)
    assert moved[6, 1, 0] == pytest.approx(100.0)
    assert moved[4, 4, 0] == pytest.approx(0.0)


def test_affine_zoom_scales_about_centre():
    image = np.zeros((9, 9, 1), dtype="float32")
    image[4, 6] = 100.0
    # A scale of 0.5 samples half the field of view, so content moves twice as far from the centre.
    zoomed = _transform(image, scale=0.5)
    assert zoomed[4, 8, 0] == pytest.approx(100.0)
    assert zoomed[4, 4, 0] == pytest.approx(0.0)


def test_rot90_needs_square_images():
    with pytest.raises(ConfigError, match=r"augmentation.rot90: needs square images"):
        build_augmenter(augmentation("strong"), (32, 48), seed=0)


def test_negative_strength_raises():
    with pytest.raises(ConfigError, match=r"augmentation.zoom: must be 0 or positive; got -0.1"):
        build_augmenter(augmentation("none", "augmentation.zoom=-0.1"), (32, 32), seed=0)


def test_datasets_yield_resized_float_batches(synthetic_root):
    cfg = compose_config([f"dataset.root={synthetic_root}"]).dataset
    records = scan_images(cfg, synthetic_root)[:10]
    dataset = make_dataset(records, synthetic_root, (24, 20), 4, training=False)
    batches = list(dataset)
    assert [int(images.shape[0]) for images, _ in batches] == [4, 4, 2]
    images, labels = batches[0]
    assert images.shape[1:] == (24, 20, 3)
    assert images.dtype.name == "float32"
    assert float(np.max(images)) <= 255.0
    assert list(labels.numpy()) == [record.label for record in records[:4]]


def test_evaluation_dataset_is_not_augmented(synthetic_root):
    cfg = compose_config([f"dataset.root={synthetic_root}"]).dataset
    records = scan_images(cfg, synthetic_root)[:6]
    first = np.concatenate([images for images, _ in make_dataset(records, synthetic_root, (16, 16), 3, training=False)])
    second = np.concatenate([images for images, _ in make_dataset(records, synthetic_root, (16, 16), 3, training=False)])
    np.testing.assert_array_equal(first, second)
