"""Keras callbacks of a run: MLflow epoch logging, best-epoch tracking and checkpoints.

The state that decides the best epoch and early stopping is kept in plain
attributes and written with every checkpoint, so a resumed run continues
the same selection instead of starting it over.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import keras
import mlflow
import numpy as np

from fungiexp.resume import STATE_FILE
from fungiexp.tracking import metric_name

log = logging.getLogger(__name__)

LAST_MODEL = "last.keras"
BEST_WEIGHTS = "best.weights.h5"


def keras_to_mlflow_name(key: str) -> str:
    """Map a Keras log key to an MLflow metric name with its split: ``val_loss`` -> ``val/loss``."""
    if key.startswith("val_"):
        return metric_name(f"val/{key[len('val_'):]}")
    return metric_name(f"train/{key}")


class MlflowEpochLogger(keras.callbacks.Callback):
    """Log Keras epoch metrics to the active MLflow run, with the 1-based epoch as step.

    Also logs ``time/epoch_seconds``, the wall-clock time of the epoch
    including its validation pass, so that stalls show in the curves, and
    keeps ``last_epoch_end`` (``time.perf_counter``) for timing what follows.
    """

    def __init__(self):
        super().__init__()
        self.epoch_start = None
        self.last_epoch_end = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        metrics = {keras_to_mlflow_name(key): float(value) for key, value in (logs or {}).items()}
        self.last_epoch_end = time.perf_counter()
        if self.epoch_start is not None:
            metrics["time/epoch_seconds"] = self.last_epoch_end - self.epoch_start
        mlflow.log_metrics(metrics, step=epoch + 1)


class ValidationScores(keras.callbacks.Callback):
    """Score the validation split after every epoch: ``val_loss``, ``val_accuracy`` and ``val_macro_f1``.

    One prediction pass gives all three, so Keras's own validation pass is
    not needed (``fit`` gets no ``validation_data``). The scores go into the
    epoch logs before the callbacks that log metrics and pick the best epoch,
    so ``trainer.monitor`` can select on any of them. This callback is given
    the validation split only, so selection never reads the test split.

    Args:
        dataset: Batched (image, label) dataset of the validation split.
        labels: Integer labels of that split, in the dataset's order.
        num_classes: Number of classes.
        loss: The training loss; given one-hot labels when ``one_hot`` is set.
        one_hot: Whether ``loss`` expects one-hot labels (label smoothing).
    """

    def __init__(self, dataset, labels, num_classes: int, loss, one_hot: bool = False):
        super().__init__()
        self.dataset = dataset
        self.labels = np.asarray(labels)
        self.num_classes = num_classes
        self.loss = loss
        self.targets = np.eye(num_classes, dtype="float32")[self.labels] if one_hot else self.labels

    def on_epoch_end(self, epoch, logs=None):
        from fungiexp.evaluate import macro_f1

        probabilities = self.model.predict(self.dataset, verbose=0)
        if logs is None:
            return
        logs["val_loss"] = float(keras.ops.convert_to_numpy(self.loss(self.targets, probabilities)))
        logs["val_accuracy"] = float(np.mean(np.argmax(probabilities, axis=1) == self.labels))
        logs["val_macro_f1"] = macro_f1(self.labels, probabilities, self.num_classes)


class BestEpoch(keras.callbacks.Callback):
    """Track the best epoch by a validation metric, stop early, and restore its weights at the end.

    Args:
        monitor: Epoch log key: ``val_loss`` (lower is better), ``val_accuracy`` or ``val_macro_f1``.
        patience: Epochs without improvement before stopping; None never stops.
        min_delta: Smallest change that counts as an improvement.
        restore_best: Set the best epoch's weights when training ends.
        state: State saved by ``get_state`` of an interrupted run, to resume from.
        best_weights_path: File holding the best epoch's weights, read when resuming.
        model: The complete model whose weights are kept, when ``fit`` trains
            only part of it (the frozen-feature cache); None for the model being fit.
    """

    def __init__(self, monitor, patience, min_delta, restore_best, state=None, best_weights_path=None, model=None):
        super().__init__()
        self.complete_model = model
        self.monitor = monitor
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.restore_best = restore_best
        self.sign = 1.0 if "loss" in monitor else -1.0
        self.best = (state or {}).get("best", math.inf)
        self.best_epoch = (state or {}).get("best_epoch", 0)
        self.wait = (state or {}).get("wait", 0)
        self.best_weights_path = best_weights_path
        self.best_weights = None
        self.improved = False

    @property
    def kept(self) -> keras.Model:
        """The model whose weights are kept and restored."""
        return self.complete_model if self.complete_model is not None else self.model

    def on_train_begin(self, logs=None):
        if self.best_epoch and self.best_weights_path and Path(self.best_weights_path).is_file():
            current = self.kept.get_weights()
            self.kept.load_weights(self.best_weights_path)
            self.best_weights = self.kept.get_weights()
            self.kept.set_weights(current)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        self.improved = False
        if value is None:
            log.warning("trainer.monitor=%s is not in the epoch logs; the best epoch is not tracked", self.monitor)
            return
        score = self.sign * float(value)
        if score < self.best - self.min_delta:
            self.best, self.best_epoch, self.wait, self.improved = score, epoch + 1, 0, True
            if self.restore_best:
                self.best_weights = self.kept.get_weights()
            return
        self.wait += 1
        if self.patience is not None and self.wait >= self.patience:
            log.info("Early stopping after epoch %d: %s has not improved for %d epochs", epoch + 1, self.monitor, self.wait)
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.restore_best and self.best_weights is not None:
            self.kept.set_weights(self.best_weights)
            log.info("Restored the weights of epoch %d, the best by %s", self.best_epoch, self.monitor)

    def get_state(self) -> dict:
        """Return the selection state to write with a checkpoint."""
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}


class WeightAverage(keras.callbacks.Callback):
    """Keep an exponential moving average of the weights and score, select and keep the averaged model.

    After every training step each floating-point weight (batch-normalisation
    statistics included) moves towards the model's current value:
    ``average = d * average + (1 - d) * weight``. Early steps use a smaller
    ``d``, ``min(decay, (1 + step) / (10 + step))``, so the average does not
    remember the random initial weights. At the end of every epoch the model
    gets the averaged weights. Validation, best-epoch selection, the
    checkpoint and the final model therefore all see them. The next epoch
    trains on from the weights that training reached. Give this callback
    before the one that scores the validation split.

    Args:
        decay: Largest weight of the previous average, below 1 (0.998
            averages over about the last 500 steps).
    """

    def __init__(self, decay: float):
        super().__init__()
        self.decay = float(decay)
        self.step = 0
        self.averages = None
        self.trained = None
        self._update = None

    def _weights(self):
        return [weight for weight in self.model.weights if "float" in str(weight.dtype)]

    def on_train_begin(self, logs=None):
        weights = self._weights()
        self.averages = [keras.Variable(keras.ops.convert_to_numpy(weight.value), trainable=False, name=f"average_{i}") for i, weight in enumerate(weights)]
        self.trained = None

        import tensorflow as tf

        @tf.function
        def update(decay):
            for average, weight in zip(self.averages, weights):
                average.assign(decay * average + (1.0 - decay) * keras.ops.cast(weight.value, average.dtype))

        self._update = update

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        decay = min(self.decay, (1.0 + self.step) / (10.0 + self.step))
        self._update(np.float32(decay))

    def on_epoch_end(self, epoch, logs=None):
        weights = self._weights()
        self.trained = [keras.ops.convert_to_numpy(weight.value) for weight in weights]
        for weight, average in zip(weights, self.averages):
            weight.assign(average.value)

    def on_epoch_begin(self, epoch, logs=None):
        if self.trained is not None:
            for weight, values in zip(self._weights(), self.trained):
                weight.assign(values)
            self.trained = None


class EpochVariable(keras.callbacks.Callback):
    """Set a variable to the 0-based epoch at the start of every epoch (it seeds the shuffle)."""

    def __init__(self, variable):
        super().__init__()
        self.variable = variable

    def on_epoch_begin(self, epoch, logs=None):
        self.variable.assign(epoch)


class InterruptGuard(keras.callbacks.Callback):
    """Signal handler and callback that make sure an interrupt stops training.

    ``handle`` raises KeyboardInterrupt, as Python's own SIGINT handler does.
    Python ignores an exception raised while an object is being finalised
    ("Exception ignored in ..."), so a signal that arrives during the clean-up
    of a TensorFlow iterator would be lost and training would go on. The
    guard therefore also records the signal and raises again after the next
    batch or epoch.
    """

    def __init__(self):
        super().__init__()
        self.received: int | None = None

    def handle(self, signum, frame):
        self.received = signum
        raise KeyboardInterrupt(f"received signal {signum}")

    def _check(self):
        if self.received is not None:
            raise KeyboardInterrupt(f"received signal {self.received}")

    def on_train_batch_end(self, batch, logs=None):
        self._check()

    def on_epoch_end(self, epoch, logs=None):
        self._check()


class EpochCheckpoint(keras.callbacks.Callback):
    """Write the model, the best weights and the selection state after every epoch.

    ``model`` is the complete model to save when ``fit`` trains only part of
    it. The state also keeps the augmentation layers' random-generator state, so a
    resumed run continues the same random sequence. Every file is written
    under a temporary name and renamed into place, so a kill during a write
    leaves the previous checkpoint intact.
    """

    def __init__(self, directory: Path, best_epoch: BestEpoch, generators=(), model=None):
        super().__init__()
        self.complete_model = model
        self.directory = Path(directory)
        self.best_epoch = best_epoch
        self.generators = list(generators)

    def on_epoch_end(self, epoch, logs=None):
        self.directory.mkdir(parents=True, exist_ok=True)
        saved = self.complete_model if self.complete_model is not None else self.model
        atomic_save(self.directory / LAST_MODEL, saved.save)
        if self.best_epoch.improved:
            atomic_save(self.directory / BEST_WEIGHTS, saved.save_weights)
        state = {
            "epoch": epoch + 1,
            **self.best_epoch.get_state(),
            "augmentation_rng": [keras.ops.convert_to_numpy(generator.state).tolist() for generator in self.generators],
        }
        atomic_save(self.directory / STATE_FILE, lambda path: Path(path).write_text(json.dumps(state)))


def atomic_save(path: Path, write) -> None:
    """Call ``write(temporary_path)`` and rename the result to ``path``.

    The temporary name keeps the file's suffixes, which Keras uses to pick
    the format.
    """
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(str(temporary))
    os.replace(temporary, path)
