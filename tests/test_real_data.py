"""Smoke tests on the real DeFungi archive; skipped where it is absent."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from conftest import DEFUNGI_ZIP, compose_config
from fungiexp.fetch import fetch
from fungiexp.images import scan_images
from fungiexp.split import manifest_csv, split_records
from fungiexp.train import train

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(
        not DEFUNGI_ZIP.is_file(),
        reason=f"DeFungi archive not found at {DEFUNGI_ZIP}; set FUNGIEXP_DEFUNGI_ZIP to run the real-data tests",
    ),
]


@pytest.fixture(scope="module")
def defungi_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("real") / "defungi"
    fetch(compose_config([f"dataset.root={root}", f"dataset.source={DEFUNGI_ZIP}"]).dataset)
    return root


def test_archive_holds_published_counts(defungi_root):
    records = scan_images(compose_config([f"dataset.root={defungi_root}"]).dataset, defungi_root)
    counts = {}
    for record in records:
        counts[record.code] = counts.get(record.code, 0) + 1
    assert len(records) == 9114
    assert counts == {"H1": 4404, "H2": 2334, "H3": 819, "H5": 818, "H6": 739}


@pytest.mark.parametrize("level", ["source_image", "sample"])
def test_real_split_has_no_leak(defungi_root, level):
    cfg = compose_config([f"dataset.root={defungi_root}", f"dataset.split.group_by={level}"]).dataset
    splits = split_records(scan_images(cfg, defungi_root), cfg.split)
    groups = [{getattr(record, level) for record in splits[name]} for name in ("train", "val", "test")]
    assert not groups[0] & groups[1]
    assert not groups[0] & groups[2]
    assert not groups[1] & groups[2]
    assert len(splits["test"]) == pytest.approx(0.15 * 9114, rel=0.1)


@pytest.mark.slow
def test_real_data_smoke_run(defungi_root, tmp_path):
    cfg = compose_config(
        [
            f"dataset.root={defungi_root}",
            "dataset.limit_per_class=30",
            "dataset.image_size=[32,32]",
            "trainer.epochs=1",
            "trainer.verbose=0",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/artifacts",
            f"trainer.checkpoint_dir={tmp_path}/checkpoints",
        ]
    )
    result = train(cfg)
    run = MlflowClient(tracking_uri=result["tracking_uri"]).get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert set(result["test"]["per_class"]) == {"H1", "H2", "H3", "H5", "H6"}
    assert result["test"]["confusion"].sum() == int(run.data.params["data.test_images"])


def test_real_folds_cover_each_group_once(defungi_root):
    base = [f"dataset.root={defungi_root}", "dataset.split.folds=5"]
    val_groups = []
    for fold in range(5):
        cfg = compose_config([*base, f"dataset.split.fold={fold}"]).dataset
        splits = split_records(scan_images(cfg, defungi_root), cfg.split)
        val_groups.append({record.source_image for record in splits["val"]})
        non_test = {record.source_image for name in ("train", "val") for record in splits[name]}
    assert sum(len(groups) for groups in val_groups) == len(non_test)
    assert set().union(*val_groups) == non_test


def test_real_split_is_reproducible(defungi_root):
    cfg = compose_config([f"dataset.root={defungi_root}"]).dataset
    records = scan_images(cfg, defungi_root)
    first = manifest_csv(split_records(records, cfg.split), list(cfg.classes))
    second = manifest_csv(split_records(records, cfg.split), list(cfg.classes))
    assert first == second


@pytest.mark.slow
def test_real_data_predict_held_out_samples(defungi_root, tmp_path, capsys):
    import csv
    import shutil

    from fungiexp.predict import predict_main

    cfg = compose_config(
        [
            f"dataset.root={defungi_root}",
            "dataset.limit_per_class=40",
            "dataset.image_size=[48,48]",
            "trainer.epochs=2",
            "trainer.verbose=0",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/artifacts",
            f"trainer.checkpoint_dir={tmp_path}/checkpoints",
        ]
    )
    result = train(cfg)
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    explain = {info.path for info in client.list_artifacts(result["run_id"], "explain")}
    assert {"explain/gradcam.png", "explain/augmentation_preview.png", "explain/error_gallery.png"} <= explain

    manifest = client.download_artifacts(result["run_id"], "data/split.csv", str(tmp_path))
    with open(manifest, newline="") as stream:
        test_rows = [row for row in csv.DictReader(stream) if row["split"] == "test"]
    samples = sorted({row["sample"] for row in test_rows})[:2]
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    for row in test_rows:
        if row["sample"] in samples:
            shutil.copy(defungi_root / row["path"], held_out / row["path"].split("/")[-1])
    (held_out / "H1_999a_1.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")

    output = tmp_path / "predictions.csv"
    status = predict_main(
        [result["run_id"], str(held_out), "--group-by", "sample", "--output", str(output), "--tracking-uri", result["tracking_uri"]]
    )
    assert status == 1
    assert "H1_999a_1.jpg" in capsys.readouterr().err
    with open(output, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == sum(row["sample"] in samples for row in test_rows)
    codes = ["H1", "H2", "H3", "H5", "H6"]
    for row in rows:
        assert sum(float(row[f"p_{code}"]) for code in codes) == pytest.approx(1.0, abs=1e-4)
    with open(tmp_path / "predictions_by_sample.csv", newline="") as stream:
        assert sorted(row["sample"] for row in csv.DictReader(stream)) == samples


def test_real_fetch_from_file_url_then_again(tmp_path, caplog):
    root = tmp_path / "data" / "defungi"
    cfg = compose_config([f"dataset.root={root}", f"dataset.source={DEFUNGI_ZIP.resolve().as_uri()}"]).dataset
    fetch(cfg)
    assert len(scan_images(cfg, root)) == 9114
    assert sorted(path.name for path in root.iterdir()) == ["BASH", "BBH", "GMA", "SHC", "TSH"]
    with caplog.at_level("INFO"):
        fetch(cfg)
    assert "already exists; nothing to fetch" in caplog.text


def test_killed_fetch_leaves_no_data_folder(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "data" / "defungi"
    process = subprocess.Popen(
        [sys.executable, "-m", "fungiexp", "data", "fetch", f"dataset.root={root}", f"dataset.source={DEFUNGI_ZIP}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Wait until extraction has started, then kill the process without warning.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any((tmp_path / "data").glob(".defungi.fetch-*/extracted/*")):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert not root.exists()

    cfg = compose_config([f"dataset.root={root}", f"dataset.source={DEFUNGI_ZIP}"]).dataset
    fetch(cfg)
    assert len(scan_images(cfg, root)) == 9114
    assert [path.name for path in (tmp_path / "data").iterdir()] == ["defungi"]
