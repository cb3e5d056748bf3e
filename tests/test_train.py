"""Whole runs on synthetic images, checked through what MLflow stored."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT
from fungiexp.errors import DataError
from fungiexp.callbacks import keras_to_mlflow_name
from fungiexp.train import train

pytestmark = pytest.mark.slow


def stored_run(result):
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    return client, client.get_run(result["run_id"])


def artifact_text(client, run_id, path, tmp_path):
    local = client.download_artifacts(run_id, path, str(tmp_path))
    return Path(local).read_text()


def test_run_logs_everything_to_mlflow(make_config, tmp_path):
    cfg = make_config("trainer.epochs=2", "augmentation=none")
    result = train(cfg)
    client, run = stored_run(result)

    assert run.info.status == "FINISHED"
    assert len(run.data.params) > 20
    assert run.data.params["dataset.root"] == str(cfg.dataset.root)
    assert run.data.params["model.preprocessing_resolved"] == "rescale"

    for name in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [point.step for point in history] == [1, 2], name
    for code in ("H1", "H2", "H3", "H5", "H6"):
        for measure in ("precision", "recall", "f1", "support"):
            assert f"test/{code}/{measure}" in run.data.metrics
    for name in ("test/accuracy", "test/macro_f1", "test/weighted_f1", "val/best_macro_f1"):
        assert name in run.data.metrics

    artifacts = {info.path for folder in ("plots", "config", "data", "evaluation", "model") for info in client.list_artifacts(run.info.run_id, folder)}
    assert {
        "plots/confusion_matrix.png",
        "plots/accuracy_curve.png",
        "plots/loss_curve.png",
        "config/resolved.yaml",
        "data/split.csv",
        "evaluation/classification_report.json",
        "evaluation/classification_report.txt",
        "model/model.keras",
    } <= artifacts

    report = json.loads(artifact_text(client, run.info.run_id, "evaluation/classification_report.json", tmp_path))
    rows = list(csv.DictReader(io.StringIO(artifact_text(client, run.info.run_id, "data/split.csv", tmp_path))))
    test_rows = [row for row in rows if row["split"] == "test"]
    assert sum(map(sum, report["confusion"])) == len(test_rows)
    assert int(run.data.metrics["test/H1/support"]) == sum(row["code"] == "H1" for row in test_rows)

    sides = {}
    for row in rows:
        sides.setdefault(row["source_image"], set()).add(row["split"])
    assert all(len(names) == 1 for names in sides.values())

    assert run.data.tags["fungiexp.data.split_sha256"]
    assert run.data.tags["fungiexp.version.tensorflow"]
    assert "fungiexp.git.commit" in run.data.tags


def test_logged_model_predicts(make_config, tmp_path):
    result = train(make_config("augmentation=strong"))
    client, run = stored_run(result)
    path = client.download_artifacts(run.info.run_id, "model/model.keras", str(tmp_path))
    model = keras.saving.load_model(path, safe_mode=True)
    assert model.output_shape == (None, 5)


def test_vgg16_block5_random_weights_runs(make_config):
    result = train(make_config("model=vgg16", "fine_tune=block5", "model.weights=null", "tracking.log_model=false"))
    _, run = stored_run(result)
    assert run.info.status == "FINISHED"
    assert run.data.params["fine_tune.trainable_from"] == "block5_conv1"
    assert int(run.data.params["model.frozen_params"]) > 0


def test_small_cnn_three_classes_runs(make_config):
    result = train(make_config("model=small_cnn", "dataset=defungi_h123", "augmentation=notebook"))
    _, run = stored_run(result)
    assert set(result["test"]["per_class"]) == {"H1", "H2", "H3"}
    assert "test/H5/f1" not in run.data.metrics


def test_failing_run_ends_failed(make_config, monkeypatch):
    def broken_fit(*args, **kwargs):
        raise RuntimeError("simulated failure inside fit")

    monkeypatch.setattr(keras.Model, "fit", broken_fit)
    cfg = make_config()
    with pytest.raises(RuntimeError, match="simulated failure"):
        train(cfg)
    client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    experiment = client.get_experiment_by_name("test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert "simulated failure" in artifact_text(client, run.info.run_id, "logs/traceback.txt", Path(cfg.tracking.artifact_root).parent)


def test_keras_names_map_to_split_prefixes():
    assert keras_to_mlflow_name("loss") == "train/loss"
    assert keras_to_mlflow_name("val_accuracy") == "val/accuracy"


def run_cli(*args, cwd, hydra_full_error=True):
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    if hydra_full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "fungiexp", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )


def test_cli_train_prints_summary(quick_overrides, tmp_path):
    completed = run_cli("train", *quick_overrides, f"hydra.run.dir={tmp_path}/hydra", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Test results on" in completed.stdout
    assert "macro F1" in completed.stdout
    assert "H6 Epidermophyton floccosum" in completed.stdout
    assert "MLflow run:" in completed.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in completed.stdout
    assert (tmp_path / "hydra" / "train.log").is_file()


def test_cli_prints_composed_config(tmp_path):
    completed = run_cli("train", "model=vgg16", "fine_tune=block5", "optimizer.lr=1e-3", "--cfg", "job", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "trainable_from: block5_conv1" in completed.stdout
    assert "lr: 0.001" in completed.stdout


def test_cfg_printout_warns_invalid_value(quick_overrides, tmp_path):
    completed = run_cli("train", *quick_overrides, "optimizer.lr=-1", "--cfg", "job", "--package", "optimizer", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "lr: -1" in completed.stdout
    assert "fungiexp train: warning: this config would not run: optimizer.lr: must be positive; got -1." in completed.stderr


def test_cli_rejects_unknown_command(tmp_path):
    completed = run_cli("fly", cwd=tmp_path)
    assert completed.returncode == 2
    assert "unknown command 'fly'" in completed.stderr


def test_cli_help_lists_train():
    completed = run_cli("--help", cwd=REPO_ROOT)
    assert completed.returncode == 0
    assert "train" in completed.stdout


def test_train_help_says_experiment_needs_a_plus():
    completed = run_cli("train", "--help", cwd=REPO_ROOT)
    assert completed.returncode == 0
    assert "model: small_cnn, small_cnn_bn, vgg16" in completed.stdout
    assert "add them with a plus, as in +experiment=NAME" in completed.stdout


def test_cli_names_a_misspelt_group_option(tmp_path):
    completed = run_cli("train", "model=small_cn", cwd=tmp_path)
    assert completed.returncode == 1
    assert "model=small_cn: no such option" in completed.stderr
    assert "Did you mean small_cnn?" in completed.stderr
    assert "HYDRA_FULL_ERROR" not in completed.stderr


def test_cli_config_error_exits_without_traceback(quick_overrides, tmp_path):
    completed = run_cli("train", *quick_overrides, "fine_tune=block5", f"hydra.run.dir={tmp_path}/hydra", cwd=tmp_path)
    assert completed.returncode == 1
    assert "fine_tune=block5 does not apply to model=small_cnn" in completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr


def test_cli_multirun_groups_jobs_under_parent(quick_overrides, tmp_path):
    completed = run_cli(
        "train", "-m", *quick_overrides, "augmentation=none,notebook", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("Test results on") == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get("fungiexp.sweep.role") == "parent"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert "augmentation=none,notebook" in parent.data.tags["fungiexp.sweep.overrides"]
    names = sorted(run.info.run_name for run in children)
    assert len(names) == 2
    assert names[0].endswith(",augmentation=none")
    assert names[1].endswith(",augmentation=notebook")
    assert "dataset.root" not in names[0]
    assert all(run.info.status == "FINISHED" for run in children)


def test_cli_multirun_failed_job_does_not_stop_others(quick_overrides, root_with_bad_files, tmp_path):
    # Job 0 stops on the bad files (a data error, found only when the job reads its data); job 1 skips them.
    overrides = [item for item in quick_overrides if not item.startswith("dataset.root=")]
    completed = run_cli(
        "train", "-m", *overrides, f"dataset.root={root_with_bad_files}", "dataset.on_bad_image=error,skip",
        f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path, hydra_full_error=False,
    )
    assert completed.returncode == 1
    marker = "fungiexp train: error: a job of the sweep failed: "
    assert marker in completed.stderr
    ending = completed.stderr.split(marker)[-1]
    assert "TSH/H1_40a_1.jpg" in ending
    assert "dataset.on_bad_image=skip" in ending
    assert "Traceback" not in completed.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    finished = [run for run in runs if run.data.tags.get("fungiexp.sweep.job") == "1"]
    assert [run.info.status for run in finished] == ["FINISHED"]
    (parent,) = [run for run in runs if run.data.tags.get("fungiexp.sweep.role") == "parent"]
    assert parent.info.status == "FAILED"


def test_cli_multirun_checks_every_job_first(quick_overrides, tmp_path):
    completed = run_cli("train", "-m", *quick_overrides, "fine_tune=all,block5", "optimizer.lr=1e-3,-1", cwd=tmp_path)
    assert completed.returncode == 1
    assert completed.stderr.splitlines()[-1].startswith("fungiexp train: error: the job with fine_tune=all optimizer.lr=-1: optimizer.lr: must be positive")
    # No job started, so no store was created.
    assert not (tmp_path / "mlruns").exists()


def test_cli_config_error_is_one_line(quick_overrides, tmp_path):
    completed = run_cli("train", *quick_overrides, "optimizer.lr=-1", cwd=tmp_path, hydra_full_error=False)
    assert completed.returncode == 1
    assert completed.stderr.splitlines()[-1] == "fungiexp train: error: optimizer.lr: must be positive; got -1."
    # Hydra did not start, so it left no job folder.
    assert not (tmp_path / "outputs").exists()
    assert not (tmp_path / "mlruns").exists()


def test_cli_multirun_unreadable_override_is_one_line(tmp_path):
    completed = run_cli("train", "-m", "trainer.seed=range(1,", cwd=tmp_path, hydra_full_error=False)
    assert completed.returncode == 1
    assert "fungiexp train: error: no viable alternative at input 'range(1,'" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.fixture
def root_with_bad_files(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    (root / "TSH" / "H1_40a_1.jpg").write_bytes(b"")
    (root / "BASH" / "H2_41a_1.jpg").write_text("not an image")
    return root


def test_bad_files_stop_run_before_training(make_config, root_with_bad_files, tmp_path):
    cfg = make_config(f"dataset.root={root_with_bad_files}")
    with pytest.raises(DataError, match=r"(?s)zero-byte files: 1.*TSH/H1_40a_1.jpg.*dataset.on_bad_image=skip"):
        train(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert client.search_runs([client.get_experiment_by_name("test").experiment_id]) == []


def test_skipped_files_are_logged(make_config, root_with_bad_files, tmp_path):
    result = train(make_config(f"dataset.root={root_with_bad_files}", "dataset.on_bad_image=skip"))
    client, run = stored_run(result)
    assert run.data.metrics["data/skipped_images"] == 2
    skipped = artifact_text(client, run.info.run_id, "data/skipped.csv", tmp_path)
    assert "TSH/H1_40a_1.jpg,zero_byte" in skipped
    assert "BASH/H2_41a_1.jpg,not_image" in skipped
    assert int(run.data.params["data.train_images"]) + int(run.data.params["data.val_images"]) + int(run.data.params["data.test_images"]) == 90


def test_manifest_run_uses_same_test_set(make_config, tmp_path):
    first = train(make_config("dataset.split.seed=5"))
    client, run = stored_run(first)
    manifest = client.download_artifacts(run.info.run_id, "data/split.csv", str(tmp_path))
    second = train(make_config(f"dataset.split.manifest={manifest}"))
    _, rerun = stored_run(second)
    assert rerun.data.tags["fungiexp.data.split_sha256"] == run.data.tags["fungiexp.data.split_sha256"]
    assert rerun.data.params["data.test_images"] == run.data.params["data.test_images"]


def test_from_scratch_recipe_options_run_and_log_intervals(make_config, tmp_path):
    cfg = make_config(
        "trainer.epochs=2",
        "model.batch_norm=true",
        "model.head.type=gap",
        "optimizer=adamw",
        "trainer.label_smoothing=0.1",
        "trainer.ema_decay=0.9",
        "trainer.monitor=val_macro_f1",
        "trainer.precision=mixed_bfloat16",
        "evaluation.tta=true",
        "evaluation.tta_views=dihedral",
        "evaluation.bootstrap.resamples=200",
        "evaluation.class_offsets.tune=true",
    )
    result = train(cfg)
    client, run = stored_run(result)

    assert run.info.status == "FINISHED"
    assert [point.step for point in client.get_metric_history(run.info.run_id, "val/macro_f1")] == [1, 2]
    metrics = run.data.metrics
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "H1/recall"):
        assert metrics[f"test/{name}_ci_low"] <= metrics[f"test/{name}"] <= metrics[f"test/{name}_ci_high"], name
    assert run.data.tags["fungiexp.bootstrap.unit"] == "source_image"
    assert "intervals" in result["test"]
    for name in ("offsets/H1", "offsets/H6", "val/offsets_macro_f1", "test/without_offsets/macro_f1"):
        assert name in metrics, name
    assert metrics["val/offsets_macro_f1"] >= metrics["val/best_macro_f1"]
    offsets = json.loads(artifact_text(client, run.info.run_id, "evaluation/class_offsets.json", tmp_path))
    assert offsets["codes"] == ["H1", "H2", "H3", "H5", "H6"]
    # The next job of a sweep starts in float32 again.
    assert keras.mixed_precision.global_policy().name == "float32"


def test_selection_never_reads_the_test_split(make_config, monkeypatch, tmp_path):
    import numpy as np
    import tensorflow as tf

    from fungiexp import train as train_module

    reads = []
    phase = {"fitting": False}
    real_make_dataset = train_module.make_dataset

    def spying_make_dataset(records, *args, **kwargs):
        files = frozenset(str(record.path) for record in records)

        def note(images, labels):
            token = tf.numpy_function(lambda: (reads.append((files, phase["fitting"])), np.int32(0))[1], [], tf.int32)
            with tf.control_dependencies([token]):
                return tf.identity(images), labels

        return real_make_dataset(records, *args, **kwargs).map(note)

    real_fit = keras.Model.fit

    def spying_fit(self, *args, **kwargs):
        phase["fitting"] = True
        try:
            return real_fit(self, *args, **kwargs)
        finally:
            phase["fitting"] = False

    real_tune = train_module.evaluate.tune_class_offsets
    reads_before_tuning = []

    def spying_tune(*args, **kwargs):
        reads_before_tuning.extend(files for files, _ in reads)
        return real_tune(*args, **kwargs)

    monkeypatch.setattr(train_module, "make_dataset", spying_make_dataset)
    monkeypatch.setattr(keras.Model, "fit", spying_fit)
    monkeypatch.setattr(train_module.evaluate, "tune_class_offsets", spying_tune)
    result = train(
        make_config(
            "trainer.epochs=3",
            "trainer.monitor=val_macro_f1",
            "trainer.early_stopping.patience=1",
            "augmentation=none",
            "evaluation.class_offsets.tune=true",
        )
    )

    client, run = stored_run(result)
    rows = list(csv.DictReader(io.StringIO(artifact_text(client, run.info.run_id, "data/split.csv", tmp_path))))
    split_files = {name: frozenset(row["path"] for row in rows if row["split"] == name) for name in ("train", "val", "test")}
    during_fit = {files for files, fitting in reads if fitting}
    after_fit = {files for files, fitting in reads if not fitting}
    assert split_files["val"] in during_fit
    assert split_files["test"] not in during_fit
    assert split_files["test"] in after_fit
    # The class offsets are chosen before the test split is read.
    assert reads_before_tuning
    assert split_files["test"] not in reads_before_tuning


def test_images_cached_on_disk_above_the_memory_budget(make_config, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="fungiexp"):
        result = train(make_config("trainer.epochs=2", "trainer.image_cache.memory_mb=0", f"trainer.image_cache.dir={tmp_path}/images"))
    assert "Decoded images cached on disk" in caplog.text
    assert any((tmp_path / "images").rglob("train*"))
    client, run = stored_run(result)
    assert run.info.status == "FINISHED"


def test_gradient_functions_registered_by_a_job_are_forgotten():
    import tensorflow as tf

    from fungiexp import train as train_module

    before = train_module._custom_gradient_names()

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, x * x)
        return tape.gradient(y, x)

    step(tf.constant(2.0))
    assert train_module._custom_gradient_names() - before
    train_module._forget_custom_gradients(before)
    assert train_module._custom_gradient_names() == before
