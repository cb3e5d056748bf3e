"""The training recipe: data, model, fit, evaluation and MLflow logging of one run."""

from __future__ import annotations

import gc
import logging
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from fungiexp import evaluate, plots, tracking
from fungiexp.errors import ConfigError
from fungiexp.data import PreparedData, prepare_data
from fungiexp.datacheck import format_report
from fungiexp.models import build_model, count_parameters, resolve_preprocessing
from fungiexp.pipeline import build_augmenter, make_dataset
from fungiexp.split import SPLITS, fingerprint
from fungiexp.validate import validate_config

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")


def train(cfg: DictConfig) -> dict:
    """Run one experiment from a composed config and log it to MLflow.

    Returns:
        A dict with ``test`` (the metrics of ``evaluate.evaluate_predictions``),
        ``val_macro_f1``, ``val_accuracy``, ``run_id``, ``experiment_id``,
        ``tracking_uri``, ``class_infos`` and ``history``.
    """
    validate_config(cfg)
    uri, experiment_id = tracking.setup_tracking(cfg.tracking)
    _configure_threads(cfg.trainer.threads)
    keras.backend.clear_session()
    gc.collect()
    keras.utils.set_random_seed(int(cfg.trainer.seed))

    log.info("Preparing data from %s", cfg.dataset.root)
    data = prepare_data(cfg.dataset)
    codes = data.codes

    log.info("Building model %s (fine_tune=%s)", cfg.model.name, cfg.fine_tune.name)
    image_size = tuple(int(side) for side in cfg.dataset.image_size)
    model = build_model(cfg.model, cfg.fine_tune, len(codes), image_size)
    model.compile(
        optimizer=build_optimizer(cfg.optimizer),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=cfg.trainer.jit_compile,
    )
    augmenter = build_augmenter(cfg.augmentation, image_size, int(cfg.trainer.seed))
    batch_size = int(cfg.trainer.batch_size)
    class_root = data.report.class_root
    train_ds = make_dataset(
        data.splits["train"], class_root, image_size, batch_size, training=True, augmenter=augmenter, seed=int(cfg.trainer.seed)
    )
    val_ds = make_dataset(data.splits["val"], class_root, image_size, batch_size, training=False)
    test_ds = make_dataset(data.splits["test"], class_root, image_size, batch_size, training=False)

    run = mlflow.start_run(experiment_id=experiment_id, run_name=_run_name(cfg))
    log.info("MLflow run %s in experiment %r (%s)", run.info.run_id, cfg.tracking.experiment, uri)
    try:
        result = _tracked_run(cfg, model, data, train_ds, val_ds, test_ds)
    except KeyboardInterrupt:
        log.warning("Interrupted; MLflow run %s ends as KILLED", run.info.run_id)
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        log.exception("Run failed; MLflow run %s ends as FAILED", run.info.run_id)
        _log_failure(traceback.format_exc())
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")

    result.update(run_id=run.info.run_id, experiment_id=experiment_id, tracking_uri=uri, class_infos=data.infos)
    return result


def build_optimizer(optimizer_cfg: DictConfig) -> keras.optimizers.Optimizer:
    """Build the Keras optimizer that ``optimizer`` describes."""
    name = str(optimizer_cfg.name)
    lr = float(optimizer_cfg.lr)
    if lr <= 0:
        raise ConfigError("optimizer.lr", f"must be positive; got {lr}.")
    weight_decay = optimizer_cfg.get("weight_decay")
    if name == "adam":
        return keras.optimizers.Adam(
            learning_rate=lr,
            beta_1=float(optimizer_cfg.beta_1),
            beta_2=float(optimizer_cfg.beta_2),
            epsilon=float(optimizer_cfg.epsilon),
            weight_decay=weight_decay,
        )
    if name == "sgd":
        return keras.optimizers.SGD(
            learning_rate=lr,
            momentum=float(optimizer_cfg.momentum),
            nesterov=bool(optimizer_cfg.nesterov),
            weight_decay=weight_decay,
        )
    raise ConfigError("optimizer.name", f"must be one of {', '.join(OPTIMIZERS)}; got {name!r}.")


def class_weights(labels: list[int], num_classes: int, mode: str) -> dict[int, float] | None:
    """Return Keras class weights: ``balanced`` gives n / (k * count) per class, ``none`` gives None."""
    if mode == "none":
        return None
    counts = Counter(labels)
    total = len(labels)
    return {label: total / (num_classes * counts[label]) if counts[label] else 0.0 for label in range(num_classes)}


class MlflowEpochLogger(keras.callbacks.Callback):
    """Log Keras epoch metrics to the active MLflow run, with the 1-based epoch as step."""

    def on_epoch_end(self, epoch, logs=None):
        metrics = {keras_to_mlflow_name(key): float(value) for key, value in (logs or {}).items()}
        mlflow.log_metrics(metrics, step=epoch + 1)


def keras_to_mlflow_name(key: str) -> str:
    """Map a Keras log key to an MLflow metric name with its split: ``val_loss`` -> ``val/loss``."""
    if key.startswith("val_"):
        return f"val/{key[len('val_'):]}"
    return f"train/{key}"


def _tracked_run(cfg, model, data: PreparedData, train_ds, val_ds, test_ds) -> dict:
    codes = data.codes
    names = [info.display_name for info in data.infos]
    splits = data.splits

    log.info("Logging config, split and provenance")
    params = tracking.flatten_config(cfg)
    trainable, frozen = count_parameters(model)
    params.update(
        {
            "model.preprocessing_resolved": resolve_preprocessing(cfg.model),
            "model.trainable_params": str(trainable),
            "model.frozen_params": str(frozen),
        }
    )
    for name in SPLITS:
        params[f"data.{name}_images"] = str(len(splits[name]))
        for code, count in data.counts[name].items():
            params[f"data.{name}.{code}"] = str(count)
    tracking.log_params(params)
    tags = tracking.provenance_tags()
    tags["fungiexp.data.split_sha256"] = fingerprint(data.manifest)
    mlflow.set_tags(tags)
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
    mlflow.log_text(data.manifest, "data/split.csv")
    mlflow.log_text(format_report(data.report), "data/check.txt")
    mlflow.log_metric("data/skipped_images", len(data.skipped))
    if data.skipped:
        mlflow.log_text(data.skipped_csv(), "data/skipped.csv")
    _log_hydra_files()

    log.info("Training for up to %d epochs", cfg.trainer.epochs)
    weights = class_weights([record.label for record in splits["train"]], len(codes), str(cfg.trainer.class_weight))
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=int(cfg.trainer.epochs),
        class_weight=weights,
        callbacks=_callbacks(cfg.trainer),
        verbose=int(cfg.trainer.verbose),
        # The training dataset shuffles itself every epoch.
        shuffle=False,
    )
    history_dict = {key: [float(value) for value in values] for key, values in history.history.items()}

    log.info("Evaluating on the validation and test splits")
    val_probabilities = model.predict(val_ds, verbose=0)
    val_true = np.array([record.label for record in splits["val"]])
    val_macro_f1 = evaluate.macro_f1(val_true, val_probabilities, len(codes))
    val_accuracy = float(np.mean(np.argmax(val_probabilities, axis=1) == val_true))
    mlflow.log_metrics({"val/best_macro_f1": val_macro_f1, "val/best_accuracy": val_accuracy})
    test_probabilities = model.predict(test_ds, verbose=0)
    test_true = np.array([record.label for record in splits["test"]])
    test = evaluate.evaluate_predictions(test_true, test_probabilities, codes)
    _log_test_metrics(test, codes)

    log.info("Logging figures, report and model")
    title = f"{cfg.model.name} on {cfg.dataset.name} ({_run_name(cfg)})"
    mlflow.log_figure(plots.plot_confusion_matrix(test["confusion"], names, f"Test confusion matrix: {title}"), "plots/confusion_matrix.png")
    mlflow.log_figure(plots.plot_curve(history_dict, "accuracy", f"Accuracy: {title}"), "plots/accuracy_curve.png")
    mlflow.log_figure(plots.plot_curve(history_dict, "loss", f"Loss: {title}"), "plots/loss_curve.png")
    report = {key: value for key, value in test.items() if key not in ("confusion", "report_text")}
    report["confusion"] = test["confusion"].tolist()
    report["class_names"] = names
    mlflow.log_dict(report, "evaluation/classification_report.json")
    mlflow.log_text(test["report_text"], "evaluation/classification_report.txt")
    if cfg.tracking.log_model:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.keras"
            model.save(path)
            mlflow.log_artifact(str(path), "model")
    _log_job_log()

    return {"test": test, "val_macro_f1": val_macro_f1, "val_accuracy": val_accuracy, "history": history_dict}


def _log_test_metrics(test: dict, codes: list[str]) -> None:
    metrics = {
        f"test/{key}": test[key]
        for key in (
            "accuracy",
            "balanced_accuracy",
            "macro_precision",
            "macro_recall",
            "macro_f1",
            "weighted_precision",
            "weighted_recall",
            "weighted_f1",
        )
    }
    for code in codes:
        for measure, value in test["per_class"][code].items():
            metrics[f"test/{code}/{measure}"] = float(value)
    mlflow.log_metrics(metrics)


def _callbacks(trainer_cfg: DictConfig) -> list[keras.callbacks.Callback]:
    callbacks: list[keras.callbacks.Callback] = [MlflowEpochLogger()]
    early = trainer_cfg.early_stopping
    if early.enabled or trainer_cfg.restore_best:
        # With early stopping off, a patience longer than training keeps the
        # callback only for restoring the best epoch's weights.
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=str(trainer_cfg.monitor),
                patience=int(early.patience) if early.enabled else int(trainer_cfg.epochs) + 1,
                min_delta=float(early.min_delta),
                restore_best_weights=bool(trainer_cfg.restore_best),
                verbose=1,
            )
        )
    return callbacks


def _configure_threads(threads_cfg: DictConfig) -> None:
    intra, inter = int(threads_cfg.intra_op), int(threads_cfg.inter_op)
    try:
        if intra and tf.config.threading.get_intra_op_parallelism_threads() != intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter and tf.config.threading.get_inter_op_parallelism_threads() != inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError as error:
        # TensorFlow fixes its thread pools when it first runs an op, so a
        # later job of the same process keeps the first job's settings.
        log.warning("trainer.threads not applied (%s); TensorFlow keeps its current thread pools", error)


def _run_name(cfg: DictConfig) -> str:
    if cfg.tracking.run_name:
        return str(cfg.tracking.run_name)
    overrides = _hydra_overrides()
    # Paths and logging settings describe where a run went, not what it tried.
    hidden = ("tracking.", "hydra.", "dataset.root=", "dataset.source=", "trainer.verbose=")
    shown = [item for item in overrides if not item.lstrip("+~").startswith(hidden)]
    return ",".join(shown)[:250] if shown else "defaults"


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _log_hydra_files() -> None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir) / str(hydra_cfg.output_subdir or ".hydra")
    if folder.is_dir():
        mlflow.log_artifacts(str(folder), "config/hydra")


def _log_job_log() -> None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    path = Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"
    for handler in logging.getLogger().handlers:
        handler.flush()
    if path.is_file():
        mlflow.log_artifact(str(path), "logs")


def _log_failure(text: str) -> None:
    try:
        mlflow.log_text(text, "logs/traceback.txt")
        _log_job_log()
    except Exception as error:  # noqa: BLE001 - the original error matters more
        log.error("Could not log the traceback to MLflow: %s", error)
