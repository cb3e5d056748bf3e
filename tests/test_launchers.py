"""Hydra's joblib and submitit launchers and the Optuna sweeper, on synthetic data."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fungiexp", *args], cwd=cwd, capture_output=True, text=True, timeout=900, env={**os.environ}
    )


def children(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    return client, [run for run in runs if run.data.tags.get("fungiexp.sweep.role") != "parent"]


def test_joblib_runs_four_parallel_jobs(quick_overrides, tmp_path):
    completed = run_cli(
        "train",
        "-m",
        *quick_overrides,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=4",
        "trainer.threads.intra_op=1",
        "trainer.threads.inter_op=1",
        "trainer.epochs=2",
        "trainer.seed=1,2,3,4",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    client, runs = children(tmp_path)
    assert len(runs) == 4
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [point.step for point in client.get_metric_history(run.info.run_id, "val/loss")] == [1, 2]
        assert "test/macro_f1" in run.data.metrics
        assert {info.path for info in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/confusion_matrix.png"}


def test_submitit_local_job_is_tracked(quick_overrides, tmp_path):
    completed = run_cli(
        "train", "-m", *quick_overrides, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    _, runs = children(tmp_path)
    assert [run.info.status for run in runs] == ["FINISHED"]


def test_optuna_sweep_prints_best_parameters(quick_overrides, tmp_path):
    completed = run_cli(
        "train",
        "-m",
        *quick_overrides,
        "+search=optuna_vgg16",
        "hydra.sweeper.n_trials=3",
        "model.weights=null",
        "model.head.dense_units=8",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    output = completed.stdout + completed.stderr
    assert "Best parameters" in output
    _, runs = children(tmp_path)
    assert len(runs) == 3


def test_mirrored_strategy_over_two_logical_cpus(quick_overrides, tmp_path):
    completed = run_cli(
        "train",
        *quick_overrides,
        "trainer.strategy=mirrored",
        "trainer.logical_cpus=2",
        f"hydra.run.dir={tmp_path}/hydra",
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    log_text = (tmp_path / "hydra" / "train.log").read_text()
    assert "trainer.strategy=mirrored over 2 devices" in log_text
    _, runs = children(tmp_path)
    assert [run.info.status for run in runs] == ["FINISHED"]
