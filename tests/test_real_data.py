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
