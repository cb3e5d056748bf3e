import keras
import numpy as np

from fungiexp.callbacks import WeightAverage


class Recorder(keras.callbacks.Callback):
    """Record the first weight matrix at the start of every epoch and after every epoch's callbacks."""

    def __init__(self):
        super().__init__()
        self.at_begin = []
        self.at_end = []

    def on_epoch_begin(self, epoch, logs=None):
        self.at_begin.append(keras.ops.convert_to_numpy(self.model.weights[0].value).copy())

    def on_epoch_end(self, epoch, logs=None):
        self.at_end.append(keras.ops.convert_to_numpy(self.model.weights[0].value).copy())


def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization(), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    return model


def test_weight_average_trains_from_raw_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.integers(0, 3, size=64)
    model = tiny_model()
    average = WeightAverage(decay=0.9)
    # The recorder comes after the average, as the validation callback does in a run.
    recorder = Recorder()
    trained_at_end = []

    class Trained(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            trained_at_end.append(average.trained[0].copy())

    model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False, callbacks=[average, recorder, Trained()])

    averaged = [keras.ops.convert_to_numpy(variable.value) for variable in average.averages]
    final = [keras.ops.convert_to_numpy(weight.value) for weight in model.weights]
    # The model keeps the averaged weights, batch-normalisation statistics included.
    assert len(averaged) == len(final)
    for model_weight, average_weight in zip(final, averaged):
        np.testing.assert_allclose(model_weight, average_weight)
    # Callbacks after the average see the averaged weights, which differ from the trained ones.
    for seen, trained in zip(recorder.at_end, trained_at_end):
        assert not np.allclose(seen, trained)
    # Each epoch after the first starts from the weights training reached, not from the average.
    for begin, trained in zip(recorder.at_begin[1:], trained_at_end[:-1]):
        np.testing.assert_allclose(begin, trained)
