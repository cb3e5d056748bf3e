"""Runs against an MLflow tracking server, and `fungiexp ui`, both on 127.0.0.1 only."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fungiexp.train import train

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    process = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server/mlflow.db",
            "--artifacts-destination",
            str(tmp_path / "server" / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_run_logs_to_tracking_server(mlflow_server, make_config):
    result = train(make_config("tracking=server", f"tracking.uri={mlflow_server}", "tracking.experiment=server"))
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert "test/macro_f1" in run.data.metrics
    paths = {info.path for info in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/confusion_matrix.png" in paths


def test_ui_command_serves_store(make_config, tmp_path):
    result = train(make_config())
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fungiexp", "ui", "--port", str(port), "--tracking-uri", result["tracking_uri"]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/get?run_id={result['run_id']}"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert result["run_id"] in response.read().decode()
    finally:
        process.terminate()
        process.communicate(timeout=30)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered_page(url: str, profile: Path) -> str:
    completed = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    return completed.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (.ci/run installs Debian's chromium package)")
@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_ui_shows_sweep_runs_in_chromium(store, quick_overrides, tmp_path, request):
    if store == "server":
        uri = request.getfixturevalue("mlflow_server")
        overrides = [item for item in quick_overrides if not item.startswith("tracking.")] + ["tracking=server", f"tracking.uri={uri}", "tracking.experiment=test"]
    else:
        uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
        overrides = quick_overrides
    swept = subprocess.run(
        [sys.executable, "-m", "fungiexp", "train", "-m", *overrides, "augmentation=none,notebook", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert swept.returncode == 0, swept.stderr[-3000:]
    experiment_id = MlflowClient(tracking_uri=uri).get_experiment_by_name("test").experiment_id

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([experiment_id])
    parent = max((run for run in runs if run.data.tags.get("fungiexp.sweep.role") == "parent"), key=lambda run: run.info.start_time)
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2

    def render_all(base: str) -> tuple[str, list[str]]:
        runs_page = rendered_page(f"{base}/#/experiments/{experiment_id}/runs", tmp_path / "profile")
        # MLflow 3.17 shows child runs collapsed under their parent in the runs
        # list, so each child's name is looked for on its own run page.
        run_pages = [rendered_page(f"{base}/#/experiments/{experiment_id}/runs/{run.info.run_id}", tmp_path / "profile") for run in children]
        return runs_page, run_pages

    if store == "server":
        page, run_pages = render_all(uri)
    else:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "fungiexp", "ui", "--port", str(port), "--tracking-uri", uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until_up(f"http://127.0.0.1:{port}/health", process)
            page, run_pages = render_all(f"http://127.0.0.1:{port}")
        finally:
            process.terminate()
            process.communicate(timeout=30)
    assert "Runs - Experiment" in page
    assert "augmentation=none,notebook" in page
    for run, run_page in zip(children, run_pages):
        assert run.info.run_name in run_page
    names = sorted(run.info.run_name for run in children)
    assert names[0].startswith("dataset.expected_images=null")
    assert any(name.endswith("augmentation=notebook") for name in names)
