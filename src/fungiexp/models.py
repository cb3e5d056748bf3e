"""Model builders: VGG16 transfer learning and the notebook's small CNN.

Every model takes float32 RGB images with pixels in [0, 255] and starts with
a preprocessing layer that scales them as its weights expect, so a saved
model can be applied to raw images without knowing how it was trained.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
from omegaconf import DictConfig

from fungiexp.errors import ConfigError
from fungiexp.validate import check_model

log = logging.getLogger(__name__)



# ImageNet channel means in BGR order, as keras.applications.vgg16.preprocess_input subtracts them.
IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)


def preprocessing_layer(mode: str) -> keras.layers.Layer:
    """Build the layer that scales [0, 255] RGB pixels as a model's weights expect.

    Modes:
        rescale: divide by 255, giving [0, 1].
        vgg16: the same result as ``keras.applications.vgg16.preprocess_input``
            (RGB to BGR, then subtraction of the ImageNet channel means).

    Only built-in Keras layers are used, so a saved model loads in safe mode
    and in MLflow without importing fungiexp. The vgg16 mode is a frozen 1x1
    convolution whose kernel swaps the channels and whose bias subtracts the means.
    """
    if mode == "rescale":
        return keras.layers.Rescaling(1.0 / 255.0, name="preprocessing")
    if mode != "vgg16":
        raise ValueError(f"Preprocessing mode must be 'vgg16' or 'rescale'; got {mode!r}.")
    swap = np.zeros((1, 1, 3, 3), dtype="float32")
    for source, target in ((0, 2), (1, 1), (2, 0)):
        swap[0, 0, source, target] = 1.0
    bias = -np.array(IMAGENET_BGR_MEANS, dtype="float32")
    return keras.layers.Conv2D(
        3,
        1,
        use_bias=True,
        trainable=False,
        kernel_initializer=keras.initializers.Constant(swap),
        bias_initializer=keras.initializers.Constant(bias),
        name="preprocessing",
    )


def resolve_preprocessing(model_cfg: DictConfig) -> str:
    """Return the preprocessing mode for ``model_cfg``, warning on a mismatch with ImageNet weights."""
    mode = str(model_cfg.preprocessing)
    if mode == "auto":
        mode = "vgg16" if model_cfg.name == "vgg16" else "rescale"
    if model_cfg.get("weights") == "imagenet" and mode != "vgg16":
        log.warning(
            "model.weights=imagenet with model.preprocessing=%s: the ImageNet weights were trained "
            "on vgg16 preprocessing (BGR, mean-subtracted), so features will be off",
            mode,
        )
    return mode


def build_model(model_cfg: DictConfig, fine_tune_cfg: DictConfig, num_classes: int, image_size) -> keras.Model:
    """Build the model that ``model`` names, with ``fine_tune`` applied.

    Raises:
        ConfigError: For an unknown model or head, a fine-tune setting that
            does not apply to the model, a too-small image size, or a weights
            file that does not exist (see ``validate.check_model``).
    """
    check_model(model_cfg, fine_tune_cfg, image_size)
    name = str(model_cfg.name)
    height, width = (int(side) for side in image_size)
    input_shape = (height, width, 3)
    preprocessing = resolve_preprocessing(model_cfg)

    if name == "vgg16":
        model = _build_vgg16(model_cfg, fine_tune_cfg, num_classes, input_shape, preprocessing)
    else:
        model = _build_small_cnn(model_cfg, num_classes, input_shape, preprocessing)

    trainable, frozen = count_parameters(model)
    log.info("Model %s: %d trainable and %d non-trainable parameters (frozen layers, batch-norm statistics)", name, trainable, frozen)
    return model


def count_parameters(model: keras.Model) -> tuple[int, int]:
    """Return the numbers of trainable and frozen parameters of ``model``."""
    trainable = int(sum(np.prod(weight.shape) for weight in model.trainable_weights))
    frozen = int(sum(np.prod(weight.shape) for weight in model.non_trainable_weights))
    return trainable, frozen


def _build_vgg16(model_cfg, fine_tune_cfg, num_classes, input_shape, preprocessing) -> keras.Model:
    weights = _resolve_weights(model_cfg.weights)
    try:
        base = keras.applications.VGG16(include_top=False, weights=weights, input_shape=input_shape)
    except Exception as error:
        if weights == "imagenet":
            raise ConfigError(
                "model.weights",
                f"the ImageNet weights of VGG16 could not be downloaded ({error}). Connect to the "
                "internet once so that Keras caches them in ~/.keras/models, or set model.weights "
                "to a local weights file, or model.weights=null to train from random weights.",
            ) from error
        raise
    log.info("VGG16 weights: %s", "random initialisation" if weights is None else weights)
    _apply_fine_tune(base, fine_tune_cfg, "vgg16")
    if weights is None and (fine_tune_cfg.frozen or fine_tune_cfg.trainable_from):
        log.warning(
            "model.weights=null with fine_tune=%s freezes randomly initialised VGG16 layers, which then "
            "never learn; use fine_tune=all to train from scratch, or pretrained weights",
            fine_tune_cfg.name,
        )

    inputs = keras.Input(shape=input_shape, name="image")
    x = preprocessing_layer(preprocessing)(inputs)
    # training=False keeps any normalisation layers of the backbone in inference mode.
    x = base(x, training=False)
    outputs = _head(x, model_cfg.head, model_cfg.get("activation", "relu"), num_classes)
    return keras.Model(inputs, outputs, name="vgg16_classifier")


def _build_small_cnn(model_cfg, num_classes, input_shape, preprocessing) -> keras.Model:
    blocks = [list(block) for block in model_cfg.blocks]
    kernel = int(model_cfg.kernel_size)

    inputs = keras.Input(shape=input_shape, name="image")
    x = preprocessing_layer(preprocessing)(inputs)
    batch_norm = bool(model_cfg.get("batch_norm", False))
    stem_stride = int(model_cfg.get("stem_stride", 1))
    for block_index, filters in enumerate(blocks, start=1):
        for conv_index, count in enumerate(filters, start=1):
            name = f"block{block_index}_conv{conv_index}"
            # The first convolution may stride, halving the image at a quarter of the cost.
            strides = stem_stride if (block_index, conv_index) == (1, 1) else 1
            if batch_norm:
                # Convolution, normalisation, then activation; the normalisation's shift replaces the bias.
                x = keras.layers.Conv2D(int(count), kernel, strides=strides, padding="same", use_bias=False, name=name)(x)
                x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
                x = keras.layers.Activation(str(model_cfg.activation), name=f"{name}_act")(x)
            else:
                x = keras.layers.Conv2D(
                    int(count), kernel, strides=strides, padding="same", activation=str(model_cfg.activation), name=name
                )(x)
        if block_index < len(blocks):
            x = keras.layers.MaxPooling2D(2, name=f"block{block_index}_pool")(x)
    outputs = _head(x, model_cfg.head, str(model_cfg.activation), num_classes)
    model = keras.Model(inputs, outputs, name=str(model_cfg.name))

    weights = _resolve_weights(model_cfg.weights)
    if weights is not None:
        model.load_weights(weights)
        log.info("%s weights: %s", model_cfg.name, weights)
    return model


def _head(x, head_cfg: DictConfig, activation: str, num_classes: int):
    if head_cfg.type == "flatten":
        x = keras.layers.Flatten(name="flatten")(x)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    if head_cfg.dense_units:
        x = keras.layers.Dense(int(head_cfg.dense_units), activation=activation, name="dense")(x)
    if head_cfg.dropout:
        x = keras.layers.Dropout(float(head_cfg.dropout), name="dropout")(x)
    # The output stays float32 so that softmax is stable under mixed precision.
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)


def _resolve_weights(weights) -> str | None:
    if weights is None or weights == "imagenet":
        return weights
    return str(Path(str(weights)).expanduser())


def _apply_fine_tune(base: keras.Model, fine_tune_cfg: DictConfig, model_name: str) -> None:
    """Set which backbone layers train, following ``fine_tune``.

    Batch normalisation layers stay frozen in every setting, because their
    statistics from pretraining do not survive small-batch updates.
    """
    name = str(fine_tune_cfg.name)
    if fine_tune_cfg.frozen:
        base.trainable = False
        log.info("fine_tune=%s: the whole %s backbone is frozen", name, model_name)
        return

    base.trainable = True
    first = fine_tune_cfg.trainable_from
    if first:
        names = [layer.name for layer in base.layers]
        index = names.index(first)
        for layer in base.layers[:index]:
            layer.trainable = False
        log.info("fine_tune=%s: %s layers before %s are frozen", name, model_name, first)
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
