"""Model builders and fine-tuning settings."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from conftest import compose_config
from fungiexp.errors import ConfigError
from fungiexp.models import build_model, count_parameters, preprocessing_layer


def build(*overrides, image_size=(32, 32), num_classes=5):
    cfg = compose_config(list(overrides))
    return build_model(cfg.model, cfg.fine_tune, num_classes, image_size)


def backbone(model):
    return model.get_layer("vgg16")


def test_small_cnn_matches_notebook_layers():
    model = build("model=small_cnn", image_size=(128, 128))
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.filters for layer in convs] == [16, 16, 32, 32, 64]
    assert all(layer.padding == "same" and layer.kernel_size == (3, 3) for layer in convs)
    assert sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers) == 2
    # 35,152 in the five convolutions and 32*32*64*5 + 5 in the output layer.
    assert count_parameters(model) == (362_837, 0)


def test_small_cnn_output_is_probabilities():
    model = build("model=small_cnn")
    images = np.random.default_rng(0).uniform(0, 255, size=(4, 32, 32, 3)).astype("float32")
    output = model.predict(images, verbose=0)
    assert output.shape == (4, 5)
    assert np.all(np.isfinite(output))
    np.testing.assert_allclose(output.sum(axis=1), 1.0, rtol=1e-5)


def test_vgg16_block5_trains_only_block5_and_head():
    model = build("model=vgg16", "model.weights=null", "fine_tune=block5")
    base = backbone(model)
    trainable = {layer.name for layer in base.layers if layer.trainable and layer.weights}
    assert trainable == {"block5_conv1", "block5_conv2", "block5_conv3"}
    assert all(layer.trainable for layer in model.layers if layer.name in ("dense", "predictions"))


def test_vgg16_block4_trains_blocks_4_and_5():
    base = backbone(build("model=vgg16", "model.weights=null", "fine_tune=block4"))
    trainable = {layer.name for layer in base.layers if layer.trainable and layer.weights}
    assert trainable == {f"block{b}_conv{c}" for b in (4, 5) for c in (1, 2, 3)}


def test_vgg16_frozen_trains_head_only():
    model = build("model=vgg16", "model.weights=null", "fine_tune=frozen")
    assert not backbone(model).trainable
    trainable_names = {weight.path.split("/")[0] for weight in model.trainable_weights}
    assert trainable_names == {"dense", "predictions"}


def test_vgg16_all_trains_everything():
    model = build("model=vgg16", "model.weights=null", "fine_tune=all")
    _, frozen = count_parameters(model)
    # Only the fixed preprocessing convolution: a 1x1x3x3 kernel and 3 biases.
    assert frozen == 12


def test_unknown_first_layer_raises():
    with pytest.raises(ConfigError, match=r"fine_tune.trainable_from: layer 'block6_conv1' .* does not exist in model=vgg16; valid first layers are block1_conv1"):
        build("model=vgg16", "model.weights=null", "fine_tune=block5", "fine_tune.trainable_from=block6_conv1")


@pytest.mark.parametrize("fine_tune", ["frozen", "block5", "block4"])
def test_backbone_setting_on_small_cnn_raises(fine_tune):
    with pytest.raises(ConfigError, match=rf"fine_tune={fine_tune} does not apply to model=small_cnn"):
        build("model=small_cnn", f"fine_tune={fine_tune}")


def test_vgg16_too_small_image_raises():
    with pytest.raises(ConfigError, match=r"dataset.image_size: model=vgg16 needs at least 32x32 pixels; got \[16, 16\]"):
        build("model=vgg16", "model.weights=null", image_size=(16, 16))


def test_vgg16_loads_weights_file(tmp_path):
    """Check that model.weights=PATH loads a VGG16 weights file written here."""
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_notop.weights.h5"
    source.save_weights(path)
    model = build("model=vgg16", f"model.weights={path}", "fine_tune=frozen")
    for expected, loaded in zip(source.weights, backbone(model).weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(expected), keras.ops.convert_to_numpy(loaded))


def test_missing_weights_file_raises(tmp_path):
    with pytest.raises(ConfigError, match=r"model.weights: weights file .*absent.h5 not found"):
        build("model=vgg16", f"model.weights={tmp_path / 'absent.h5'}")


def test_vgg16_preprocessing_matches_keras():
    images = np.random.default_rng(1).uniform(0, 255, size=(2, 8, 8, 3)).astype("float32")
    expected = keras.applications.vgg16.preprocess_input(images.copy())
    actual = keras.ops.convert_to_numpy(preprocessing_layer("vgg16")(images))
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-4)


def test_imagenet_weights_with_rescale_warns(caplog):
    from fungiexp.models import resolve_preprocessing

    model_cfg = compose_config(["model=vgg16", "model.preprocessing=rescale"]).model
    with caplog.at_level("WARNING"):
        assert resolve_preprocessing(model_cfg) == "rescale"
    assert "model.weights=imagenet with model.preprocessing=rescale" in caplog.text


def test_saved_model_reloads_in_safe_mode(tmp_path):
    model = build("model=small_cnn")
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    images = np.full((1, 32, 32, 3), 128.0, dtype="float32")
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-5)
