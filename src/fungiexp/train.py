"""The training recipe: data, model, fit, evaluation and MLflow logging of one run."""

from __future__ import annotations

import atexit
import ctypes
import functools
import gc
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fungiexp import evaluate, explain, features, plots, tracking
from fungiexp.callbacks import (
    BEST_WEIGHTS,
    LAST_MODEL,
    BestEpoch,
    EpochCheckpoint,
    EpochVariable,
    InterruptGuard,
    MlflowEpochLogger,
    ValidationScores,
    WeightAverage,
)
from fungiexp.errors import ConfigError
from fungiexp.data import PreparedData, prepare_data
from fungiexp.datacheck import format_report
from fungiexp.models import build_model, count_parameters, resolve_preprocessing
from fungiexp.pipeline import augmentation_generators, build_augmenter, graph_function, make_dataset
from fungiexp.resume import CHECKPOINT_TAG, find_resume_run, read_state
from fungiexp.schema import with_defaults
from fungiexp.split import SPLITS, fingerprint
from fungiexp.sweep import sweep_tags
from fungiexp.validate import validate_config

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
# Fewer test source images than this make the bootstrap intervals rough (a rule of thumb).
MIN_BOOTSTRAP_GROUPS = 30


def train(cfg: DictConfig, tags: dict[str, str] | None = None) -> dict:
    """Run one experiment from a composed config and log it to MLflow.

    With ``trainer.resume`` set to a run id (or ``last``), the interrupted run
    continues from its last checkpoint with its own logged config and split,
    logging into the same MLflow run. ``tags`` are set on the MLflow run.

    Returns:
        A dict with ``test`` (the metrics of ``evaluate.evaluate_predictions``),
        ``val_macro_f1``, ``val_accuracy``, ``run_id``, ``experiment_id``,
        ``tracking_uri``, ``class_infos`` and ``history``.
    """
    resume_point = None
    if cfg.trainer.get("resume"):
        uri, experiment_id = tracking.setup_tracking(cfg.tracking)
        resume_point = find_resume_point(cfg)
        _warn_ignored_on_resume(cfg, resume_point.config, _hydra_overrides())
        cfg = resume_point.config
        validate_config(cfg)
    else:
        validate_config(cfg)
        uri, experiment_id = tracking.setup_tracking(cfg.tracking)
    _configure_threads(cfg.trainer.threads)
    _configure_devices(cfg.trainer)
    keras.backend.clear_session()
    gc.collect()
    previous_policy = keras.mixed_precision.global_policy().name
    gradients_before = _custom_gradient_names()
    try:
        return _train(cfg, uri, experiment_id, resume_point, tags)
    finally:
        # A sweep's next job starts from the default policy unless it sets its own.
        keras.mixed_precision.set_global_policy(previous_policy)
        _forget_custom_gradients(gradients_before)
        gc.collect()
        _return_freed_memory()


def _warn_ignored_on_resume(requested: DictConfig, logged: DictConfig, overrides: list[str] | None = None) -> None:
    """Log the keys whose requested value differs from the resumed run's logged config, which wins.

    With ``overrides`` (the command line's), only keys set there count, so
    defaults that changed since the run started are not listed.
    """
    requested_values = tracking.flatten_config(requested)
    logged_values = tracking.flatten_config(logged)
    typed = [item.split("=", 1)[0].lstrip("+~") for item in overrides or []]
    ignored = sorted(
        key
        for key, value in requested_values.items()
        if key in logged_values
        and logged_values[key] != value
        and not key.startswith(("trainer.resume", "tracking.", "dataset.root", "dataset.source"))
        and (overrides is None or any(key == name or key.startswith(f"{name}.") for name in typed))
    )
    if ignored:
        log.warning(
            "trainer.resume continues the run with its logged config, so these settings are ignored: %s",
            ", ".join(f"{key}={requested_values[key]} (run has {logged_values[key]})" for key in ignored),
        )


def _train(cfg: DictConfig, uri: str, experiment_id: str, resume_point, tags) -> dict:
    precision = str(cfg.trainer.precision)
    keras.mixed_precision.set_global_policy(precision)
    if precision != "float32":
        log.info("trainer.precision=%s: layers compute in %s, weights and the output layer stay float32", precision, precision.split("_")[1])
    keras.utils.set_random_seed(int(cfg.trainer.seed))
    if cfg.trainer.deterministic:
        # Also runs stateful tf.data maps (augmentation) one batch at a time, in order.
        # TensorFlow 2.21 has no public call to turn it off again within a process.
        tf.config.experimental.enable_op_determinism()
        log.info("trainer.deterministic=true: TensorFlow op determinism is on")

    log.info("Preparing data from %s", cfg.dataset.root)
    data = prepare_data(cfg.dataset)
    steps_per_epoch = max(1, -(-len(data.splits["train"]) // int(cfg.trainer.batch_size)))

    image_size = tuple(int(side) for side in cfg.dataset.image_size)
    if resume_point:
        log.info("Loading the checkpoint of epoch %d from %s", resume_point.state["epoch"], resume_point.directory)
        model = keras.saving.load_model(resume_point.directory / LAST_MODEL, safe_mode=True)
    else:
        log.info("Building model %s (fine_tune=%s)", cfg.model.name, cfg.fine_tune.name)
        with _distribution_strategy(cfg.trainer).scope():
            model = build_model(cfg.model, cfg.fine_tune, len(data.codes), image_size)
            model.compile(
                optimizer=build_optimizer(cfg.optimizer, steps_per_epoch, int(cfg.trainer.epochs)),
                loss=build_loss(float(cfg.trainer.label_smoothing)),
                metrics=["accuracy"],
                jit_compile=cfg.trainer.jit_compile,
            )
    datasets = make_datasets(cfg, data, image_size)

    if resume_point:
        run = mlflow.start_run(run_id=resume_point.run_id)
        log.info("Resuming MLflow run %s at epoch %d", run.info.run_id, resume_point.state["epoch"] + 1)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=_run_name(cfg))
        log.info("MLflow run %s in experiment %r (%s)", run.info.run_id, cfg.tracking.experiment, uri)
    checkpoint_dir = (Path(str(cfg.trainer.checkpoint_dir)) / run.info.run_id).resolve()
    try:
        guard = InterruptGuard()
        with _signals_as_interrupt(guard.handle):
            mlflow.set_tags({**sweep_tags(), **(tags or {})})
            result = _tracked_run(cfg, model, data, datasets, checkpoint_dir, resume_point, guard)
    except KeyboardInterrupt:
        # A second Ctrl-C during the clean-up below stops the process at once.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if read_state(checkpoint_dir) is not None:
            log.warning(
                "Interrupted; MLflow run %s ends as KILLED. Continue it with: fungiexp train trainer.resume=%s",
                run.info.run_id,
                run.info.run_id,
            )
            mlflow.set_tag(tracking.RESUME_TAG, f"fungiexp train trainer.resume={run.info.run_id}")
        else:
            log.warning(
                "Interrupted before the first epoch ended; MLflow run %s ends as KILLED with no checkpoint to resume, so start a new run",
                run.info.run_id,
            )
        _log_job_log()
        mlflow.end_run("KILLED")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise
    except BaseException:
        log.exception("Run failed; MLflow run %s ends as FAILED", run.info.run_id)
        _log_failure(traceback.format_exc())
        mlflow.end_run("FAILED")
        raise
    # A finished run's resume command no longer applies. start_run fetched the resumed run with its tags.
    if resume_point and tracking.RESUME_TAG in run.data.tags:
        mlflow.delete_tag(tracking.RESUME_TAG)
    mlflow.end_run("FINISHED")

    # A resumed run stays in its own experiment, which may not be the one this command's config names.
    result.update(run_id=run.info.run_id, experiment_id=run.info.experiment_id, tracking_uri=uri, class_infos=data.infos)
    # Free this job's model, datasets and traced functions before a sweep's next job.
    del model, datasets
    keras.backend.clear_session(free_memory=True)
    return result


def _custom_gradient_names() -> set[str]:
    """Return the names in TensorFlow's global registry of gradient functions."""
    registry = _gradient_registry()
    return set(registry) if registry is not None else set()


def _forget_custom_gradients(before: set[str]) -> None:
    """Remove the gradient functions that ``tf.custom_gradient`` registered since ``before``.

    Each traced training step registers one (Keras sums gradients over
    replicas through a custom gradient, even on one device), under a new name
    in a global registry that is never emptied. Each keeps the whole traced
    step alive, so without this a sweep's process grows by several MiB per
    job. The job's graphs are gone by now, so nothing uses these functions.
    """
    registry = _gradient_registry()
    if registry is None:
        return
    for name in [name for name in registry if name not in before and name.startswith("CustomGradient-")]:
        del registry[name]


def _gradient_registry() -> dict | None:
    try:
        # NOTE: a private TensorFlow structure (2.21); if it moves, jobs only keep the old growth.
        from tensorflow.python.framework import ops as tf_ops

        return tf_ops._gradient_registry._registry
    except (ImportError, AttributeError):
        return None


def _return_freed_memory() -> None:
    """Ask the C allocator to hand freed memory back to the operating system (glibc only).

    TensorFlow frees a finished job's tensors, but glibc may keep the freed
    pages in its per-thread arenas.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


@dataclass
class ResumePoint:
    """An interrupted run to continue: its id, logged config, checkpoint folder and state."""

    run_id: str
    config: DictConfig
    directory: Path
    state: dict


def find_resume_point(cfg: DictConfig) -> ResumePoint:
    """Find the run that ``trainer.resume`` names and load its config and checkpoint state.

    Raises:
        ConfigError: If the run does not exist, already finished, or has no checkpoint.
    """
    client = MlflowClient()
    run, directory, state = find_resume_run(str(cfg.trainer.resume), mlflow.get_tracking_uri(), str(cfg.tracking.experiment))

    with tempfile.TemporaryDirectory() as folder:
        config = with_defaults(OmegaConf.load(client.download_artifacts(run.info.run_id, "config/resolved.yaml", folder)))
        manifest = directory / "split.csv"
        if not manifest.is_file():
            shutil.copy(client.download_artifacts(run.info.run_id, "data/split.csv", folder), manifest)
    # The store stays the one this command points at, and the split is the logged one.
    config.tracking = cfg.tracking
    config.dataset.split.manifest = str(manifest)
    config.trainer.resume = run.info.run_id
    log.info("Resuming run %s from the checkpoint of epoch %d in %s", run.info.run_id, state["epoch"], directory)
    return ResumePoint(run.info.run_id, config, directory, state)


def build_loss(label_smoothing: float) -> keras.losses.Loss:
    """Return the cross-entropy loss: sparse labels, or one-hot labels when ``label_smoothing`` is set.

    Keras's sparse cross-entropy has no label smoothing, so with smoothing the
    datasets carry one-hot labels (see ``make_datasets``).
    """
    if label_smoothing > 0:
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy()


def learning_rate(optimizer_cfg: DictConfig, steps_per_epoch: int, epochs: int):
    """Return the learning rate or schedule that ``optimizer`` describes.

    ``schedule=cosine`` rises linearly from 0 to ``lr`` over ``warmup_epochs``
    and then follows a cosine down to ``lr * min_lr_fraction`` at the last epoch.
    """
    lr = float(optimizer_cfg.lr)
    if str(optimizer_cfg.get("schedule", "constant")) == "constant":
        return lr
    warmup_steps = int(optimizer_cfg.warmup_epochs) * steps_per_epoch
    total_steps = max(epochs * steps_per_epoch, warmup_steps + 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else lr,
        decay_steps=total_steps - warmup_steps,
        alpha=float(optimizer_cfg.min_lr_fraction),
        warmup_target=lr if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def build_optimizer(optimizer_cfg: DictConfig, steps_per_epoch: int = 1, epochs: int = 1) -> keras.optimizers.Optimizer:
    """Build the Keras optimizer that ``optimizer`` describes, with its learning-rate schedule."""
    name = str(optimizer_cfg.name)
    lr = learning_rate(optimizer_cfg, steps_per_epoch, epochs)
    weight_decay = optimizer_cfg.get("weight_decay")
    if name in ("adam", "adamw"):
        optimizer_class = keras.optimizers.AdamW if name == "adamw" else keras.optimizers.Adam
        return optimizer_class(
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


def _tracked_run(cfg, model, data: PreparedData, datasets, checkpoint_dir: Path, resume_point, guard: InterruptGuard) -> dict:
    codes = data.codes
    splits = data.splits
    _, _, _, augmenter, epoch_variable = datasets

    if resume_point is None:
        log.info("Logging config, split and provenance")
        _log_run_inputs(cfg, model, data)
    mlflow.set_tag(CHECKPOINT_TAG, str(checkpoint_dir))

    initial_epoch = resume_point.state["epoch"] if resume_point else 0
    if resume_point:
        for generator, values in zip(augmentation_generators(augmenter), resume_point.state.get("augmentation_rng", [])):
            generator.state.assign(np.array(values, dtype=keras.ops.convert_to_numpy(generator.state).dtype))
    fit_model, fit_train_ds, fit_val_ds = _fit_inputs(cfg, model, data, datasets)
    log.info("Training epochs %d to %d", initial_epoch + 1, cfg.trainer.epochs)
    weights = class_weights([record.label for record in splits["train"]], len(codes), str(cfg.trainer.class_weight))
    callbacks = _callbacks(cfg.trainer, checkpoint_dir, resume_point, augmentation_generators(augmenter), model)
    fit_start = time.perf_counter()
    fit_model.fit(
        fit_train_ds,
        epochs=int(cfg.trainer.epochs),
        initial_epoch=initial_epoch,
        class_weight=weights,
        callbacks=[
            # The averaged weights go into the model before the validation split is scored.
            *([WeightAverage(float(cfg.trainer.ema_decay))] if cfg.trainer.ema_decay > 0 else []),
            # Before the others, so that they log and select on its scores.
            ValidationScores(
                fit_val_ds,
                [record.label for record in splits["val"]],
                len(codes),
                loss=build_loss(float(cfg.trainer.label_smoothing)),
                one_hot=float(cfg.trainer.label_smoothing) > 0,
            ),
            *callbacks,
            EpochVariable(epoch_variable),
            guard,
        ],
        verbose=int(cfg.trainer.verbose),
        # The training dataset shuffles itself every epoch.
        shuffle=False,
    )
    fit_end = time.perf_counter()
    logger = callbacks[0]
    timing = {"time/fit_seconds": fit_end - fit_start}
    if logger.last_epoch_end is not None:
        # Time between the end of the last epoch and fit's return: a stall would show here.
        timing["time/fit_exit_seconds"] = fit_end - logger.last_epoch_end
    mlflow.log_metrics(timing)
    # Read the curves back from MLflow, so that a resumed run plots every epoch.
    history = logged_history(mlflow.active_run().info.run_id)

    return evaluate_and_log(cfg, model, data, datasets, history)


def evaluate_and_log(cfg: DictConfig, model: keras.Model, data: PreparedData, datasets, history: dict[str, list[float]]) -> dict:
    """Score the trained model on the validation and test splits and log metrics, figures, report and model.

    Runs inside an active MLflow run. ``history`` contains the per-epoch curves to plot.

    Returns:
        A dict with ``test``, ``val_macro_f1``, ``val_accuracy`` and ``history``.
    """
    _, val_ds, test_ds, _, _ = datasets
    codes = data.codes
    names = [info.display_name for info in data.infos]
    splits = data.splits
    views = evaluate.tta_views(cfg.evaluation)
    log.info(
        "Evaluating on the validation and test splits%s",
        f" with test-time augmentation (mean over {len(evaluate.TTA_VIEWS[views])} views, evaluation.tta_views={views})" if views else "",
    )
    val_probabilities = predict_probabilities(model, val_ds, views)
    val_true = np.array([record.label for record in splits["val"]])
    val_macro_f1 = evaluate.macro_f1(val_true, val_probabilities, len(codes))
    val_accuracy = float(np.mean(np.argmax(val_probabilities, axis=1) == val_true))
    mlflow.log_metrics({"val/best_macro_f1": val_macro_f1, "val/best_accuracy": val_accuracy})
    offsets = _tune_class_offsets(cfg.evaluation.class_offsets, val_true, val_probabilities, codes)
    # The test split is read once, here, after training and selection have ended.
    test_probabilities = predict_probabilities(model, test_ds, views)
    test_true = np.array([record.label for record in splits["test"]])
    if offsets is not None:
        plain = evaluate.evaluate_predictions(test_true, test_probabilities, codes)
        mlflow.log_metrics({f"test/without_offsets/{key}": plain[key] for key in ("accuracy", "balanced_accuracy", "macro_f1")})
        test_probabilities = evaluate.apply_class_offsets(test_probabilities, offsets)
    test = evaluate.evaluate_predictions(test_true, test_probabilities, codes)
    test["scoring"] = {
        "tta_views": views,
        "view_count": len(evaluate.TTA_VIEWS[views]) if views else 1,
        "class_offsets": offsets is not None,
        "offsets_all_zero": offsets is not None and not np.any(offsets),
        "macro_f1_without_offsets": plain["macro_f1"] if offsets is not None else None,
    }
    bootstrap = cfg.evaluation.bootstrap
    if int(bootstrap.resamples) > 0:
        groups = len({record.source_image for record in splits["test"]})
        if groups < MIN_BOOTSTRAP_GROUPS:
            log.warning(
                "The test split contains only %d source images, too few for reliable bootstrap intervals. "
                "Raise dataset.limit_per_class (or set it to null) for intervals worth reporting",
                groups,
            )
        test["intervals"] = evaluate.bootstrap_intervals(
            test_true,
            np.argmax(test_probabilities, axis=1),
            [record.source_image for record in splits["test"]],
            codes,
            resamples=int(bootstrap.resamples),
            seed=int(bootstrap.seed),
            confidence=float(bootstrap.confidence),
        )
        test["interval_info"] = {"confidence": float(bootstrap.confidence), "resamples": int(bootstrap.resamples), "unit": "source_image"}
    _log_test_metrics(test, codes)
    test["groups"] = {
        level: evaluate.group_scores(splits["test"], test_probabilities, len(codes), level) for level in ("source_image", "sample")
    }
    mlflow.log_metrics(
        {f"test/{level}/{name}": value for level, scores in test["groups"].items() for name, value in scores.items() if name != "count"}
    )

    log.info("Logging figures, report and model")
    title = f"{cfg.model.name} on {cfg.dataset.name} ({_run_name(cfg)})"
    mlflow.log_figure(plots.plot_confusion_matrix(test["confusion"], names, f"Test confusion matrix: {title}"), "plots/confusion_matrix.png")
    mlflow.log_figure(plots.plot_curve(history, "accuracy", f"Accuracy: {title}"), "plots/accuracy_curve.png")
    mlflow.log_figure(plots.plot_curve(history, "loss", f"Loss: {title}"), "plots/loss_curve.png")
    _log_explanations(cfg, model, data, datasets, test_probabilities, names, title)
    report = {key: value for key, value in test.items() if key not in ("confusion", "report_text")}
    report["confusion"] = test["confusion"].tolist()
    report["class_names"] = names
    mlflow.log_dict(report, "evaluation/classification_report.json")
    mlflow.log_text(test["report_text"], "evaluation/classification_report.txt")
    if cfg.tracking.log_model:
        _log_model(cfg, model, image_size=tuple(int(side) for side in cfg.dataset.image_size), codes=codes)
    _log_job_log()

    return {"test": test, "val_macro_f1": val_macro_f1, "val_accuracy": val_accuracy, "history": history}


def _tune_class_offsets(settings: DictConfig, val_true: np.ndarray, val_probabilities: np.ndarray, codes: list[str]):
    """Choose and log per-class offsets on the validation split, or return None when ``tune`` is off."""
    if not settings.tune:
        return None
    offsets = evaluate.tune_class_offsets(
        val_true, val_probabilities, len(codes), float(settings.max_abs), int(settings.steps), int(settings.rounds)
    )
    tuned = evaluate.macro_f1(val_true, evaluate.apply_class_offsets(val_probabilities, offsets), len(codes))
    log.info(
        "Class offsets chosen on the validation split: %s (validation macro-F1 %.4f with them)",
        ", ".join(f"{code} {value:+.2f}" for code, value in zip(codes, offsets)),
        tuned,
    )
    mlflow.log_metrics({"val/offsets_macro_f1": tuned, **{tracking.metric_name(f"offsets/{code}"): value for code, value in zip(codes, offsets)}})
    mlflow.log_dict({"codes": codes, "offsets": [float(value) for value in offsets]}, evaluate.OFFSETS_ARTIFACT)
    return offsets


def _fit_inputs(cfg: DictConfig, model: keras.Model, data: PreparedData, datasets):
    """Return the model and the training and validation datasets that ``fit`` runs on.

    Normally the complete model on images. When the frozen-feature cache
    applies, the trainable rest of the model on cached outputs of its frozen
    leading layers. The complete model shares those layers, so it is the one
    checkpointed, evaluated and logged.
    """
    train_ds, val_ds, test_ds, augmenter, epoch_variable = datasets
    frozen = features.split_frozen_prefix(model)
    reason = features.cache_off_reason(cfg, augmenter, frozen)
    if reason:
        log.info("Frozen-feature cache not used: %s", reason)
        mlflow.set_tag("fungiexp.feature_cache", f"off: {reason}")
        return model, train_ds, val_ds

    settings = cfg.trainer.feature_cache
    image_size = tuple(int(side) for side in cfg.dataset.image_size)
    budget = {"bytes": int(settings.memory_mb) * 2**20}
    class_root = data.report.class_root
    batch_size = int(cfg.trainer.batch_size)
    log.info("Frozen-feature cache: layers up to %s run once per image; %s and after train", frozen.boundary, frozen.suffix.layers[1].name)
    stored = {}
    started = time.perf_counter()
    for name in ("train", "val"):
        records = data.splits[name]
        # The plain, ordered images of the split, whatever the training pipeline does.
        images = make_dataset(records, class_root, image_size, batch_size, training=False)
        key = features.cache_key(frozen.prefix, image_size, records, data.report.file_hashes, str(settings.dtype))
        stored[name] = features.features_for(frozen.prefix, images, len(records), key, settings, name, budget)
    actions = " and ".join(sorted(set(budget.get("actions", []))))
    # Building or loading the features of both splits, before the first epoch.
    mlflow.log_metric("time/feature_cache_seconds", time.perf_counter() - started)
    mlflow.set_tag("fungiexp.feature_cache", f"used ({actions}): layers up to {frozen.boundary} cached as {settings.dtype}")

    suffix = frozen.suffix
    suffix.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"], jit_compile=cfg.trainer.jit_compile)
    smoothing = float(cfg.trainer.label_smoothing) > 0
    labels = {name: [record.label for record in data.splits[name]] for name in ("train", "val")}
    train_features = features.feature_dataset(
        stored["train"],
        labels["train"],
        batch_size,
        training=True,
        seed=int(cfg.trainer.seed),
        epoch=epoch_variable,
        one_hot=len(data.codes) if smoothing else 0,
    )
    val_features = features.feature_dataset(stored["val"], labels["val"], batch_size, training=False)
    return suffix, train_features, val_features


def _log_explanations(cfg, model, data: PreparedData, datasets, test_probabilities, names, title) -> None:
    """Log the Grad-CAM grid, augmentation preview and error gallery that ``tracking.figures`` turns on."""
    figures = cfg.tracking.figures
    if not (figures.gradcam or figures.augmentation_preview or figures.error_gallery):
        return
    _, _, test_ds, augmenter, _ = datasets
    test_images = np.concatenate([images.numpy() for images, _ in test_ds]) if (figures.gradcam or figures.error_gallery) else None
    labels = np.array([record.label for record in data.splits["test"]])
    if figures.gradcam:
        figure = explain.gradcam_grid(model, test_images, labels, test_probabilities, names, int(figures.gradcam_per_class), title)
        mlflow.log_figure(figure, "explain/gradcam.png")
    if figures.error_gallery:
        paths = [record.path for record in data.splits["test"]]
        mlflow.log_figure(explain.error_gallery(test_images, labels, test_probabilities, paths, names, title), "explain/error_gallery.png")
    if figures.augmentation_preview:
        train_images = next(iter(_first_images(data, cfg)))
        mlflow.log_figure(explain.augmentation_preview(train_images, augmenter, f"augmentation={cfg.augmentation.name}, {title}"), "explain/augmentation_preview.png")


def _first_images(data: PreparedData, cfg: DictConfig):
    """Yield one image of each class from the training split, decoded at the run's size."""
    from fungiexp.images import read_rgb

    size = tuple(int(side) for side in cfg.dataset.image_size)
    chosen = []
    for label in range(len(data.codes)):
        record = next((record for record in data.splits["train"] if record.label == label), None)
        if record is not None:
            chosen.append(read_rgb(data.report.class_root / record.path, size))
    yield np.stack(chosen).astype("float32")


def _log_model(cfg: DictConfig, model: keras.Model, image_size, codes: list[str]) -> None:
    """Log the model as a .keras artifact and as an MLflow Keras model with a signature."""
    import mlflow.keras
    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        mlflow.log_artifact(str(path), "model")
    example = np.full((1, *image_size, 3), 128.0, dtype="float32")
    # A direct call: with trainer.strategy=mirrored, predict on a batch of one
    # fails in Keras 3.15 because one replica gets no image.
    signature = infer_signature(example, keras.ops.convert_to_numpy(model(example, training=False)))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mlflow_model"
        # NOTE: mlflow.keras.log_model (MLflow 3.17) writes the input example
        # before it creates the model folder and fails, so the folder is made
        # here and the saved model is logged as run artifacts.
        path.mkdir()
        mlflow.keras.save_model(
            model,
            str(path),
            signature=signature,
            input_example=example,
            # Listing the requirements skips MLflow's slow inference of them.
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
            metadata={"class_codes": codes, "image_size": list(image_size), "input": "RGB pixels in [0, 255]"},
        )
        mlflow.log_artifacts(str(path), "mlflow_model")
    model_uri = f"runs:/{mlflow.active_run().info.run_id}/mlflow_model"
    mlflow.set_tag("fungiexp.mlflow_model_uri", model_uri)
    if cfg.tracking.get("register_as"):
        version = mlflow.register_model(model_uri, str(cfg.tracking.register_as))
        log.info("Registered %s as model %r version %s", model_uri, version.name, version.version)


def _log_run_inputs(cfg: DictConfig, model: keras.Model, data: PreparedData) -> None:
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
        params[f"data.{name}_images"] = str(len(data.splits[name]))
        for code, count in data.counts[name].items():
            params[tracking.metric_name(f"data.{name}.{code}")] = str(count)
    tracking.log_params(params)
    tags = tracking.provenance_tags()
    tags["fungiexp.data.split_sha256"] = fingerprint(data.manifest)
    tags["fungiexp.data.content_sha256"] = data.content_fingerprint()
    tags["fungiexp.devices"] = ", ".join(device.name for device in tf.config.list_physical_devices()) or "none"
    mlflow.set_tags(tags)
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
    mlflow.log_text(data.manifest, "data/split.csv")
    mlflow.log_text(format_report(data.report, limit=None), "data/check.txt")
    mlflow.log_metric("data/skipped_images", len(data.skipped))
    if data.skipped:
        mlflow.log_text(data.skipped_csv(), "data/skipped.csv")
    _log_hydra_files()


def make_datasets(cfg: DictConfig, data: PreparedData, image_size):
    """Build the batched train, validation and test datasets of a run.

    Returns ``(train, val, test, augmenter, epoch_variable)``: the training
    dataset is shuffled and augmented, the other two are not, and
    ``epoch_variable`` seeds each epoch's shuffle.
    """
    augmenter = build_augmenter(cfg.augmentation, image_size, int(cfg.trainer.seed))
    batch_size = int(cfg.trainer.batch_size)
    class_root = data.report.class_root
    epoch_variable = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    cache_files = _image_cache_files(cfg, data, image_size)
    train_ds = make_dataset(
        data.splits["train"],
        class_root,
        image_size,
        batch_size,
        training=True,
        augmenter=augmenter,
        seed=int(cfg.trainer.seed),
        epoch=epoch_variable,
        cache_file=cache_files["train"],
    )
    val_ds = make_dataset(data.splits["val"], class_root, image_size, batch_size, training=False, cache_file=cache_files["val"])
    test_ds = make_dataset(data.splits["test"], class_root, image_size, batch_size, training=False, cache_file=cache_files["test"])
    if float(cfg.trainer.label_smoothing) > 0:
        # The smoothed loss takes one-hot labels (see build_loss); validation
        # and test labels are only read from the records.
        classes = len(data.codes)
        train_ds = train_ds.map(graph_function(lambda images, labels: (images, tf.one_hot(labels, classes))))
    return train_ds, val_ds, test_ds, augmenter, epoch_variable


def _image_cache_files(cfg: DictConfig, data: PreparedData, image_size) -> dict[str, str | None]:
    """Decide where each split's decoded images are cached: memory (None) or a file prefix on disk.

    The images of all splits stay in memory when their uint8 size fits
    ``trainer.image_cache.memory_mb``. Otherwise they are cached in a folder
    of this process under ``trainer.image_cache.dir``, which is removed when
    the process ends.
    """
    settings = cfg.trainer.image_cache
    count = sum(len(records) for records in data.splits.values())
    size = count * int(image_size[0]) * int(image_size[1]) * 3
    if size <= int(settings.memory_mb) * 2**20:
        log.info("Decoded images cached in memory: %d images, %.0f MiB", count, size / 2**20)
        return {name: None for name in SPLITS}
    folder = Path(str(settings.dir)).resolve() / f"run-{os.getpid()}-{id(data)}"
    folder.mkdir(parents=True, exist_ok=True)
    atexit.register(shutil.rmtree, folder, True)
    log.info(
        "Decoded images cached on disk in %s: %d images, %.0f MiB, above trainer.image_cache.memory_mb=%s",
        folder,
        count,
        size / 2**20,
        settings.memory_mb,
    )
    return {name: str(folder / name) for name in SPLITS}


def logged_history(run_id: str) -> dict[str, list[float]]:
    """Return a run's per-epoch loss and accuracy curves, read back from MLflow, keyed as Keras names them."""
    client = MlflowClient()
    history = {}
    for keras_key, name in (("loss", "train/loss"), ("accuracy", "train/accuracy"), ("val_loss", "val/loss"), ("val_accuracy", "val/accuracy")):
        points = sorted(client.get_metric_history(run_id, name), key=lambda point: point.step)
        history[keras_key] = [point.value for point in points]
    return history


@contextmanager
def _signals_as_interrupt(handler):
    """Let ``handler`` take SIGINT and SIGTERM while training, so both end the run the same way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, earlier in previous.items():
            signal.signal(number, earlier)


def predict_probabilities(model: keras.Model, dataset: tf.data.Dataset, views: str | None = None) -> np.ndarray:
    """Return the class probabilities of ``model`` on ``dataset``.

    With ``views`` (a key of ``evaluate.TTA_VIEWS``), the mean over those
    views of each image; None scores each image once, as it is.
    """
    if views is None:
        return model.predict(dataset, verbose=0)
    total = None
    for transpose, axes in evaluate.TTA_VIEWS[views]:
        view = dataset.map(graph_function(functools.partial(_view, transpose=transpose, axes=list(axes)))) if transpose or axes else dataset
        probabilities = model.predict(view, verbose=0)
        total = probabilities if total is None else total + probabilities
    return total / len(evaluate.TTA_VIEWS[views])


def _view(images, labels, transpose, axes):
    if transpose:
        images = tf.transpose(images, [0, 2, 1, 3])
    return tf.reverse(images, axes), labels


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
            metrics[tracking.metric_name(f"test/{code}/{measure}")] = float(value)
    for name, (low, high) in test.get("intervals", {}).items():
        metrics[tracking.metric_name(f"test/{name}_ci_low")] = low
        metrics[tracking.metric_name(f"test/{name}_ci_high")] = high
    if "interval_info" in test:
        mlflow.set_tags({f"fungiexp.bootstrap.{key}": str(value) for key, value in test["interval_info"].items()})
    mlflow.log_metrics(metrics)


def _callbacks(trainer_cfg: DictConfig, checkpoint_dir: Path, resume_point, generators, model: keras.Model) -> list[keras.callbacks.Callback]:
    early = trainer_cfg.early_stopping
    best_epoch = BestEpoch(
        monitor=str(trainer_cfg.monitor),
        patience=int(early.patience) if early.enabled else None,
        min_delta=float(early.min_delta),
        restore_best=bool(trainer_cfg.restore_best),
        state=resume_point.state if resume_point else None,
        best_weights_path=checkpoint_dir / BEST_WEIGHTS,
        model=model,
    )
    # The checkpoint runs after the MLflow logger, so a checkpointed epoch always has its metrics.
    return [MlflowEpochLogger(), best_epoch, EpochCheckpoint(checkpoint_dir, best_epoch, generators, model)]


def _distribution_strategy(trainer_cfg: DictConfig) -> tf.distribute.Strategy:
    """Return the tf.distribute strategy that ``trainer.strategy`` names."""
    if trainer_cfg.strategy == "default":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [device.name for device in gpus] or [device.name for device in tf.config.list_logical_devices("CPU")]
    log.info("trainer.strategy=mirrored over %d devices: %s", len(devices), ", ".join(devices))
    return tf.distribute.MirroredStrategy(devices=devices)


def _configure_devices(trainer_cfg: DictConfig) -> None:
    count = int(trainer_cfg.get("logical_cpus") or 0)
    if count < 2:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    except RuntimeError as error:
        # TensorFlow fixes its devices when it first runs an op.
        log.warning("trainer.logical_cpus not applied (%s); TensorFlow keeps its current devices", error)


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
    shown = tracking.meaningful_overrides(_hydra_overrides())
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
