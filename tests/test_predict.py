"""Using a trained model: predict, sample-level scores, explanations and the MLflow model."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fungiexp.evaluate import group_scores
from fungiexp.explain import grad_cam
from fungiexp.images import ImageRecord
from fungiexp.predict import predict_main
from fungiexp.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(synthetic_root, tmp_path_factory):
    """One finished small run shared by the tests of this module."""
    from conftest import compose_config

    store = tmp_path_factory.mktemp("store")
    cfg = compose_config(
        [
            f"dataset.root={synthetic_root}",
            "dataset.expected_images=null",
            "dataset.image_size=[32,32]",
            "trainer.epochs=2",
            "trainer.batch_size=8",
            "trainer.verbose=0",
            f"trainer.checkpoint_dir={store}/checkpoints",
            f"tracking.uri=sqlite:///{store}/mlflow.db",
            f"tracking.artifact_root={store}/artifacts",
            "tracking.experiment=predict",
            "tracking.register_as=fungiexp-test-model",
        ]
    )
    return train(cfg)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_run_logs_group_scores_and_figures(finished_run):
    client = MlflowClient(tracking_uri=finished_run["tracking_uri"])
    run = client.get_run(finished_run["run_id"])
    for name in ("test/source_image/accuracy", "test/source_image/macro_f1", "test/sample/accuracy", "test/sample/macro_f1"):
        assert name in run.data.metrics, name
    explain = {info.path for info in client.list_artifacts(run.info.run_id, "explain")}
    assert explain == {"explain/gradcam.png", "explain/augmentation_preview.png", "explain/error_gallery.png"}


def test_model_is_registered(finished_run):
    client = MlflowClient(tracking_uri=finished_run["tracking_uri"])
    versions = client.search_model_versions("name='fungiexp-test-model'")
    assert [version.run_id for version in versions] == [finished_run["run_id"]]


def test_predict_writes_csv_and_reports_bad_file(finished_run, synthetic_root, tmp_path, capsys):
    images = tmp_path / "new"
    shutil.copytree(synthetic_root / "TSH", images / "TSH")
    (images / "TSH" / "H1_9z_1.jpg").write_text("not an image")
    output = tmp_path / "out" / "predictions.csv"
    status = predict_main(
        [finished_run["run_id"], str(images), "--group-by", "sample", "--output", str(output), "--tracking-uri", finished_run["tracking_uri"]]
    )
    captured = capsys.readouterr()
    assert status == 1
    assert "H1_9z_1.jpg: unreadable image" in captured.err
    rows = read_csv(output)
    assert len(rows) == 18
    for row in rows:
        total = sum(float(row[f"p_{code}"]) for code in ("H1", "H2", "H3", "H5", "H6"))
        assert total == pytest.approx(1.0, abs=1e-4)
    grouped = read_csv(output.parent / "predictions_by_sample.csv")
    assert sorted(row["sample"] for row in grouped) == ["H1_1", "H1_2", "H1_3"]
    assert all(int(row["images"]) == 6 for row in grouped)


def test_mlflow_model_matches_fungiexp_predict(finished_run, synthetic_root, tmp_path, capsys):
    client = MlflowClient(tracking_uri=finished_run["tracking_uri"])
    uri = client.get_run(finished_run["run_id"]).data.tags["fungiexp.mlflow_model_uri"]
    files = sorted((synthetic_root / "GMA").glob("*.jpg"))[:3]
    output = tmp_path / "predictions.csv"
    predict_main([finished_run["run_id"], *map(str, files), "--output", str(output), "--tracking-uri", finished_run["tracking_uri"]])
    expected = [row["predicted"] for row in read_csv(output)]

    from fungiexp.images import read_rgb

    batch = np.stack([read_rgb(path, (32, 32)) for path in files]).astype("float32")
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"inputs": batch.tolist()}))
    completed = subprocess.run(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "predict",
            "-m",
            uri,
            "-i",
            str(request),
            "-t",
            "json",
            "--env-manager",
            "local",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "MLFLOW_TRACKING_URI": finished_run["tracking_uri"]},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    predictions = json.loads(completed.stdout.strip().splitlines()[-1])["predictions"]
    codes = ["H1", "H2", "H3", "H5", "H6"]
    assert [codes[int(np.argmax(row))] for row in predictions] == expected


@pytest.mark.parametrize("model_overrides", [["model=small_cnn"], ["model=vgg16", "model.weights=null", "fine_tune=all"]], ids=["small_cnn", "vgg16"])
def test_grad_cam_heatmaps_are_normalised(model_overrides):
    from conftest import compose_config
    from fungiexp.models import build_model

    cfg = compose_config(model_overrides)
    model = build_model(cfg.model, cfg.fine_tune, 5, (32, 32))
    images = np.random.default_rng(0).uniform(0, 255, size=(3, 32, 32, 3)).astype("float32")
    heatmaps = grad_cam(model, images, np.array([0, 1, 2]))
    assert heatmaps.shape == (3, 32, 32)
    assert heatmaps.min() >= 0.0
    assert heatmaps.max() <= 1.0 + 1e-6


def test_view_mean_over_tta_views():
    from fungiexp.predict import view_mean

    keras.utils.set_random_seed(0)
    # Flatten and a dense layer: not invariant to flips or rotations.
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(5, activation="softmax")])
    images = np.random.default_rng(0).uniform(0, 255, size=(2, 4, 4, 3)).astype("float32")

    def mean_over(views):
        return np.mean([model.predict(np.ascontiguousarray(view), verbose=0) for view in views], axis=0)

    flips = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    rotations = [np.rot90(images, turns, axes=(1, 2)) for turns in range(4)]
    # The eight symmetries of a square: four rotations, and each of them mirrored.
    dihedral = rotations + [view[:, :, ::-1] for view in rotations]

    np.testing.assert_allclose(view_mean(model, images, "flips"), mean_over(flips), rtol=1e-6)
    np.testing.assert_allclose(view_mean(model, images, "dihedral"), mean_over(dihedral), rtol=1e-6)
    np.testing.assert_allclose(view_mean(model, images, None), model.predict(images, verbose=0), rtol=1e-6)
    assert not np.allclose(mean_over(flips), model.predict(images, verbose=0))
    assert not np.allclose(mean_over(dihedral), mean_over(flips))


def test_group_scores_average_patches():
    records = [
        ImageRecord(path=f"p{i}", label=label, code="", source_image=f"s{group}", sample=f"m{group}")
        for i, (label, group) in enumerate([(0, 1), (0, 1), (1, 2), (1, 2)])
    ]
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])
    scores = group_scores(records, probabilities, 2, "source_image")
    assert scores == {"accuracy": 1.0, "macro_f1": 1.0, "count": 2}


def test_predict_applies_logged_class_offsets(quick_overrides, synthetic_root, tmp_path, monkeypatch, capsys):
    from conftest import compose_config
    from fungiexp import evaluate

    # Offsets this large make every image H6, whatever the model predicts.
    monkeypatch.setattr(evaluate, "tune_class_offsets", lambda *args, **kwargs: np.array([0.0, 0.0, 0.0, 0.0, 30.0]))
    result = train(compose_config([*quick_overrides, "evaluation.class_offsets.tune=true"]))
    output = tmp_path / "predictions.csv"

    # The 8-character id that fungiexp compare prints is enough.
    status = predict_main([result["run_id"][:8], str(synthetic_root / "TSH"), "--output", str(output), "--tracking-uri", result["tracking_uri"]])

    assert status == 0
    rows = read_csv(output)
    assert rows
    assert {row["predicted"] for row in rows} == {"H6"}


def test_evaluate_scores_logged_model_again(finished_run, capsys):
    from fungiexp.reevaluate import evaluate_main

    # Options may come before the overrides.
    status = evaluate_main([finished_run["run_id"], "--tracking-uri", finished_run["tracking_uri"], "evaluation.class_offsets.tune=true"])

    assert status == 0
    client = MlflowClient(tracking_uri=finished_run["tracking_uri"])
    original = client.get_run(finished_run["run_id"])
    (again,) = client.search_runs([original.info.experiment_id], filter_string=f"tags.`fungiexp.evaluates` = '{finished_run['run_id']}'")
    assert again.info.status == "FINISHED"
    assert again.data.params["evaluation.class_offsets.tune"] == "True"
    # Only evaluation keys change, so compare does not list other keys as differing.
    assert set(again.data.params) == set(original.data.params)
    assert {key: value for key, value in again.data.params.items() if not key.startswith("evaluation.")} == {
        key: value for key, value in original.data.params.items() if not key.startswith("evaluation.")
    }
    assert again.data.params["data.test_images"] == original.data.params["data.test_images"]
    # The same model on the same split: without offsets, the original scores.
    assert again.data.metrics["test/without_offsets/macro_f1"] == pytest.approx(original.data.metrics["test/macro_f1"])
    assert "offsets/H1" in again.data.metrics
    out = capsys.readouterr().out
    assert "Test results on" in out
    assert "class offsets chosen on validation (test macro F1 without them:" in out
    assert f"Scoring the model of run {finished_run['run_id']}" in out


def test_sweep_parent_run_has_no_model(finished_run, synthetic_root, capsys):
    client = MlflowClient(tracking_uri=finished_run["tracking_uri"])
    original = client.get_run(finished_run["run_id"])
    parent = client.create_run(original.info.experiment_id, tags={"fungiexp.sweep.role": "parent"})
    client.set_terminated(parent.info.run_id)
    status = predict_main([parent.info.run_id, "--tracking-uri", finished_run["tracking_uri"], str(synthetic_root)])
    assert status == 1
    error = capsys.readouterr().err
    assert "is the parent run of a sweep and has no model of its own" in error
    assert f"(fungiexp compare --experiment predict --sweep {parent.info.run_id[:8]} lists them)" in error


def test_interrupted_run_gives_resume_command(finished_run, synthetic_root, capsys):
    from fungiexp.reevaluate import evaluate_main

    client = MlflowClient(tracking_uri=finished_run["tracking_uri"])
    original = client.get_run(finished_run["run_id"])
    resume = "fungiexp train trainer.resume=abc"
    killed = client.create_run(original.info.experiment_id, tags={"fungiexp.resume_command": resume})
    client.set_terminated(killed.info.run_id, "KILLED")
    store = ["--tracking-uri", finished_run["tracking_uri"]]
    assert predict_main([killed.info.run_id, *store, str(synthetic_root)]) == 1
    assert f"has no logged model (status KILLED): it did not finish. Finish it first with: {resume}" in capsys.readouterr().err
    assert evaluate_main([killed.info.run_id, *store]) == 1
    assert f"Finish it first with: {resume}" in capsys.readouterr().err
    running = client.create_run(original.info.experiment_id)
    assert evaluate_main([running.info.run_id, *store]) == 1
    assert "has no logged model yet (status RUNNING): wait until it finishes." in capsys.readouterr().err


def test_reevaluation_plots_training_curves(finished_run, monkeypatch):
    import fungiexp.train
    from fungiexp.reevaluate import evaluate_main

    uri = finished_run["tracking_uri"]
    assert evaluate_main([finished_run["run_id"], "--tracking-uri", uri]) == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_run(finished_run["run_id"]).info.experiment_id
    first = client.search_runs([experiment], filter_string=f"tags.`fungiexp.evaluates` = '{finished_run['run_id']}'")[0]
    read = []
    original_history = fungiexp.train.logged_history
    monkeypatch.setattr(fungiexp.train, "logged_history", lambda run_id: read.append(run_id) or original_history(run_id))

    assert evaluate_main([first.info.run_id, "--tracking-uri", uri]) == 0

    # The curves come from the run that trained the model, not from the evaluate run.
    assert read == [finished_run["run_id"]]


def test_evaluate_rejects_training_overrides(finished_run, capsys):
    from fungiexp.reevaluate import evaluate_main

    status = evaluate_main([finished_run["run_id"], "trainer.epochs=3", "--tracking-uri", finished_run["tracking_uri"]])

    assert status == 1
    assert "evaluate changes only evaluation settings" in capsys.readouterr().err


def test_evaluate_rejects_yes_for_true(finished_run, capsys):
    from fungiexp.reevaluate import evaluate_main

    status = evaluate_main([finished_run["run_id"], "evaluation.tta=yes", "--tracking-uri", finished_run["tracking_uri"]])

    assert status == 1
    assert "evaluation.tta: invalid value 'yes': expected true or false." in capsys.readouterr().err


def test_evaluate_without_arguments_names_run_id(capsys):
    from fungiexp.reevaluate import evaluate_main

    with pytest.raises(SystemExit):
        evaluate_main([])
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert "the following argument is required: run_id" in last_line
    assert "overrides" not in last_line
