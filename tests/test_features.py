"""The frozen-feature cache: when it applies, what it stores, and that training on it matches."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from fungiexp import features
from fungiexp.models import build_model
from fungiexp.train import train

VGG16_BLOCK5 = ("model=vgg16", "fine_tune=block5", "model.weights=null", "augmentation=none", "model.head.type=gap")


def test_vgg16_block5_splits_after_block4():
    cfg = OmegaConf.create({"name": "vgg16", "weights": None, "preprocessing": "auto", "head": {"type": "gap", "dense_units": 0, "dropout": 0.0}})
    fine_tune = OmegaConf.create({"name": "block5", "trainable_from": "block5_conv1", "frozen": False})
    model = build_model(cfg, fine_tune, 5, (32, 32))
    frozen = features.split_frozen_prefix(model)

    assert frozen.boundary == "block4_pool"
    assert not frozen.prefix.trainable_weights
    assert {id(weight) for weight in frozen.suffix.trainable_weights} == {id(weight) for weight in model.trainable_weights}
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(frozen.suffix(frozen.prefix(images)), model(images), rtol=1e-5, atol=1e-6)


def test_small_cnn_has_nothing_to_cache(make_config):
    cfg = make_config()
    model = build_model(cfg.model, cfg.fine_tune, 5, (32, 32))
    assert features.split_frozen_prefix(model) is None
    # The reason names the model, not the augmentation that would not help.
    reason = features.cache_off_reason(cfg, object(), None)
    assert reason == "model=small_cnn with fine_tune=all has no frozen leading layers to cache"


@pytest.mark.slow
def test_feature_cache_matches_and_is_reused(make_config, tmp_path, caplog):
    common = (*VGG16_BLOCK5, "trainer.epochs=2", "trainer.deterministic=true", f"trainer.feature_cache.dir={tmp_path}/features")
    with caplog.at_level(logging.INFO, logger="fungiexp"):
        plain = train(make_config(*common, "trainer.feature_cache.enabled=false"))
        cached = train(make_config(*common, "trainer.feature_cache.persist=true"))
        built = caplog.text.count("Feature cache built")
        again = train(make_config(*common, "trainer.feature_cache.persist=true"))

    assert "Frozen-feature cache not used: trainer.feature_cache.enabled=false" in caplog.text
    assert built == 2  # the training and validation splits
    assert caplog.text.count("Feature cache reused") == 2
    assert len(list((tmp_path / "features").glob("features-*.npy"))) == 2

    client = MlflowClient(tracking_uri=plain["tracking_uri"])
    for name in ("val/loss", "val/accuracy", "train/loss"):
        first = [point.value for point in client.get_metric_history(plain["run_id"], name)]
        second = [point.value for point in client.get_metric_history(cached["run_id"], name)]
        np.testing.assert_allclose(second, first, atol=1e-3, err_msg=name)
    assert again["test"]["accuracy"] == pytest.approx(cached["test"]["accuracy"])
    run = client.get_run(cached["run_id"])
    assert run.data.tags["fungiexp.feature_cache"].startswith("used (built): layers up to block4_pool")
    assert client.get_run(again["run_id"]).data.tags["fungiexp.feature_cache"].startswith("used (reused):")

    # The logged model is the complete network, taking images.
    local = client.download_artifacts(cached["run_id"], "model/model.keras", str(tmp_path))
    model = keras.saving.load_model(local, safe_mode=True)
    assert model.input_shape == (None, 32, 32, 3)
    assert any(layer.name == "vgg16" for layer in model.layers)


@pytest.mark.slow
def test_augmentation_turns_the_cache_off_and_says_why(make_config, caplog):
    with caplog.at_level(logging.INFO, logger="fungiexp"):
        result = train(make_config(*VGG16_BLOCK5, "augmentation=strong"))
    assert "augmentation=strong transforms training images randomly" in caplog.text
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    assert client.get_run(result["run_id"]).data.tags["fungiexp.feature_cache"].startswith("off: augmentation=strong")


def test_disk_cache_is_read_batch_by_batch(tmp_path):
    settings = OmegaConf.create({"dtype": "float16", "persist": True, "dir": str(tmp_path)})
    prefix = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(2, 3, padding="same", trainable=False)])
    images = np.arange(6 * 4 * 4 * 3, dtype="float32").reshape(6, 4, 4, 3) / 100
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(6, "int32"))).batch(4)
    stored = features.features_for(prefix, dataset, 6, "k", settings, "train", {"bytes": 0})
    assert isinstance(stored, np.memmap)
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored, prefix(images).numpy(), rtol=1e-2, atol=1e-2)
    batches = list(features.feature_dataset(stored, np.arange(6), 4, training=False))
    assert [len(labels) for _, labels in batches] == [4, 2]
