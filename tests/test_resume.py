"""Runs that fail safely: interruption, resume, checkpoints and tracking-store limits."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONF_DIR, compose_config, write_synthetic_dataset
from fungiexp.callbacks import LAST_MODEL, InterruptGuard, atomic_save
from fungiexp.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slower_root(tmp_path_factory):
    """Enough images at 64x64 that an epoch takes a second or more, so a signal lands between epochs."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("slower") / "data", source_images=24, patches=4, size=64)


def wait_for_epoch(state_glob: str, base: Path, epoch: int, process, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in base.glob(state_glob):
            if json.loads(path.read_text())["epoch"] >= epoch:
                return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch {epoch} within {timeout} s")


def store_overrides(root: Path, tmp_path: Path, experiment: str) -> list[str]:
    """Overrides of a five-epoch run on ``root`` that logs to its own store under ``tmp_path``."""
    return [
        f"dataset.root={root}",
        "dataset.expected_images=null",
        "dataset.image_size=[64,64]",
        "trainer.epochs=5",
        "trainer.batch_size=8",
        "trainer.verbose=0",
        f"trainer.checkpoint_dir={tmp_path}/checkpoints",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        f"tracking.artifact_root={tmp_path}/mlruns/artifacts",
        f"tracking.experiment={experiment}",
    ]


def test_sigint_kills_run_and_resume_finishes(slower_root, tmp_path):
    overrides = [
        *store_overrides(slower_root, tmp_path, "resume"),
        "trainer.early_stopping.enabled=false",
        "trainer.deterministic=true",
        "augmentation=strong",
        f"hydra.run.dir={tmp_path}/hydra",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "fungiexp", "train", *overrides],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_epoch("checkpoints/*/state.json", tmp_path, 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "KILLED", stderr[-3000:]
    assert run.data.tags["fungiexp.resume_command"] == f"fungiexp train trainer.resume={run.info.run_id}"
    checkpoint = Path(run.data.tags["fungiexp.checkpoint_dir"])
    completed = json.loads((checkpoint / "state.json").read_text())["epoch"]
    assert 2 <= completed < 5
    assert (checkpoint / LAST_MODEL).is_file()
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == completed

    cfg = compose_config([item for item in overrides if not item.startswith("hydra.")] + ["trainer.resume=last"])
    result = train(cfg)
    assert result["run_id"] == run.info.run_id
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert "fungiexp.resume_command" not in resumed.data.tags
    steps = [point.step for point in client.get_metric_history(run.info.run_id, "val/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5]

    uninterrupted_cfg = compose_config(
        [item for item in overrides if not item.startswith(("hydra.", "tracking.experiment"))] + ["tracking.experiment=whole"]
    )
    uninterrupted = train(uninterrupted_cfg)
    whole = client.get_run(uninterrupted["run_id"]).data.metrics
    for name in ("test/accuracy", "test/macro_f1", "test/H1/recall", "val/loss", "train/loss"):
        assert resumed.data.metrics[name] == whole[name], name


def test_sigint_in_sweep_kills_parent_run(slower_root, tmp_path):
    overrides = [*store_overrides(slower_root, tmp_path, "sweep"), "trainer.seed=1,2", f"hydra.sweep.dir={tmp_path}/sweep"]
    process = subprocess.Popen(
        [sys.executable, "-m", "fungiexp", "train", "-m", *overrides], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_epoch("checkpoints/*/state.json", tmp_path, 1, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get("fungiexp.sweep.role") == "parent"]
    (job,) = [run for run in runs if run.data.tags.get("fungiexp.sweep.role") != "parent"]
    assert job.info.status == "KILLED", stderr[-3000:]
    assert parent.info.status == "KILLED", stderr[-3000:]


def test_failed_sweep_job_fails_parent_run(synthetic_root, quick_overrides, tmp_path):
    # Job 0 stops on an empty image file (a data error, found when the job reads its data), job 1 skips it:
    # Hydra then exits with status 1 and skips on_multirun_end.
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    (root / "TSH" / "H1_40a_1.jpg").write_bytes(b"")
    overrides = [item for item in quick_overrides if not item.startswith("dataset.root=")]
    completed = subprocess.run(
        [
            sys.executable, "-m", "fungiexp", "train", "-m", *overrides, f"dataset.root={root}",
            "dataset.on_bad_image=error,skip", f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 1, completed.stderr[-3000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get("fungiexp.sweep.role") == "parent"]
    (job,) = [run for run in runs if run.data.tags.get("fungiexp.sweep.role") != "parent"]
    assert job.info.status == "FINISHED"
    assert parent.info.status == "FAILED", completed.stderr[-3000:]


def test_resume_of_finished_run_raises(make_config):
    result = train(make_config())
    with pytest.raises(ValueError, match=rf"trainer.resume: run {result['run_id']} already finished"):
        train(make_config(f"trainer.resume={result['run_id']}"))
    # The 8-character id that compare prints names the same run.
    with pytest.raises(ValueError, match=rf"trainer.resume: run {result['run_id']} already finished"):
        train(make_config(f"trainer.resume={result['run_id'][:8]}"))


def test_resume_last_needs_checkpoint(tmp_path):
    from fungiexp.resume import CHECKPOINT_TAG, STATE_FILE, find_resume_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("resume")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / STATE_FILE).write_text(json.dumps({"epoch": 2}))
    older = client.create_run(experiment_id, start_time=1000, tags={CHECKPOINT_TAG: str(saved)})
    client.set_terminated(older.info.run_id, "KILLED")
    # Interrupted before its first epoch ended: the folder was named but nothing was saved.
    newer = client.create_run(experiment_id, start_time=2000, tags={CHECKPOINT_TAG: str(tmp_path / "empty")})
    client.set_terminated(newer.info.run_id, "KILLED")

    run, directory, state = find_resume_run("last", uri, "resume")
    assert run.info.run_id == older.info.run_id
    assert directory == saved
    assert state == {"epoch": 2}


def test_cli_resume_error_is_one_line(make_config, quick_overrides, tmp_path):
    finished = train(make_config())["run_id"]
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    for requested, message in (
        (finished[:8], f"run {finished} already finished; nothing to resume."),
        ("0123abcd", f"run '0123abcd' not found in sqlite:///{tmp_path}/mlruns/mlflow.db."),
        # Hydra alone would read this prefix as the number 7.36359e14.
        ("736359e9", f"run '736359e9' not found in sqlite:///{tmp_path}/mlruns/mlflow.db."),
    ):
        completed = subprocess.run(
            [sys.executable, "-m", "fungiexp", "train", *quick_overrides, f"trainer.resume={requested}"],
            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600,
        )
        assert completed.returncode == 1
        assert completed.stderr.splitlines() == [f"fungiexp train: error: trainer.resume: {message}"]
    # The checks ran before Hydra started, so no job folder was made.
    assert not (tmp_path / "outputs").exists()


def test_exception_in_training_exits_nonzero(synthetic_root, tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, keras\n"
            "def broken(*a, **k):\n    raise RuntimeError('simulated failure')\n"
            "keras.Model.fit = broken\n"
            "from fungiexp.cli import main\nsys.exit(main())",
            "train",
            f"dataset.root={synthetic_root}",
            "dataset.expected_images=null",
            "dataset.image_size=[32,32]",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/artifacts",
            f"trainer.checkpoint_dir={tmp_path}/checkpoints",
            f"hydra.run.dir={tmp_path}/hydra",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode != 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("defungi").experiment_id])
    assert run.info.status == "FAILED"
    artifacts = {info.path for info in client.list_artifacts(run.info.run_id, "logs")}
    assert "logs/traceback.txt" in artifacts


def test_long_values_and_many_keys_are_logged(make_config, tmp_path):
    long_name = "x" * 10_000
    extra_classes = [f"+dataset.class_info.X{index}={{folder:F{index},species:none}}" for index in range(300)]
    result = train(make_config(f"dataset.name={long_name}", *extra_classes, "tracking.log_model=false"))
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert len(run.data.params) > 600
    assert run.data.params["dataset.name"].endswith("...[truncated]")
    config = Path(client.download_artifacts(run.info.run_id, "config/resolved.yaml", str(tmp_path))).read_text()
    assert long_name in config
    assert "X299" in config


def test_interrupted_write_keeps_previous_checkpoint(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = tmp_path / LAST_MODEL
    atomic_save(path, model.save)
    before = model.get_weights()

    def crash_midway(temporary):
        Path(temporary).write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save(path, crash_midway)
    reloaded = keras.saving.load_model(path)
    for expected, actual in zip(before, reloaded.get_weights()):
        np.testing.assert_array_equal(expected, actual)


def test_artifact_failure_ends_run_failed(make_config, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mlflow.log_figure", disk_full)
    cfg = make_config("trainer.epochs=2")
    with pytest.raises(OSError, match="No space left on device"):
        train(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.tracking.artifact_root).parent}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FAILED"
    assert [point.step for point in client.get_metric_history(run.info.run_id, "val/loss")] == [1, 2]
    assert "test/accuracy" in run.data.metrics


def test_old_logged_config_gets_new_defaults(make_config):
    from omegaconf import OmegaConf

    from fungiexp.schema import with_defaults
    from fungiexp.validate import validate_config

    current = make_config()
    old = OmegaConf.create(OmegaConf.to_container(current))
    del old.trainer["feature_cache"], old.trainer["image_cache"], old["evaluation"], old.optimizer["schedule"]
    restored = with_defaults(old)
    validate_config(restored)
    # The schema's defaults are the YAML files' defaults.
    defaults = OmegaConf.load(CONF_DIR / "trainer" / "default.yaml")
    assert restored.trainer.feature_cache == defaults.feature_cache
    assert restored.trainer.image_cache == defaults.image_cache
    assert restored.evaluation == current.evaluation
    assert restored.optimizer.schedule == "constant"
    assert restored.dataset.root == current.dataset.root


def test_interrupt_guard_stops_after_lost_signal():
    guard = InterruptGuard()
    # A KeyboardInterrupt raised inside a finaliser is dropped by Python, as here.
    with contextlib.suppress(KeyboardInterrupt):
        guard.handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        guard.on_train_batch_end(0)


def test_resume_warns_about_ignored_overrides(caplog):
    from fungiexp.train import _warn_ignored_on_resume

    logged = compose_config(["trainer.epochs=30"])
    requested = compose_config(["trainer.epochs=14", "trainer.resume=last"])
    with caplog.at_level("WARNING"):
        _warn_ignored_on_resume(requested, logged)
    assert "these settings are ignored: trainer.epochs=14 (run has 30)" in caplog.text


def test_resume_warning_lists_only_typed_overrides(caplog):
    from fungiexp.train import _warn_ignored_on_resume

    # The run was made with other values than today's defaults; only the typed key is reported.
    logged = compose_config(["trainer.epochs=30", "dataset.image_size=[32,32]", "model=small_cnn_bn"])
    requested = compose_config(["trainer.epochs=14", "trainer.resume=last"])
    with caplog.at_level("WARNING"):
        _warn_ignored_on_resume(requested, logged, ["trainer.epochs=14", "trainer.resume=last"])
    assert "trainer.epochs=14 (run has 30)" in caplog.text
    assert "dataset.image_size" not in caplog.text
    assert "model." not in caplog.text
