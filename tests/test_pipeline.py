"""Input pipeline and augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import compose_config
from fungiexp.errors import ConfigError
from fungiexp.images import scan_images
from fungiexp.pipeline import build_augmenter, make_dataset


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
    assert names == ["RandomFlip", "RandomRotation", "RandomTranslation", "RandomZoom"]


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
