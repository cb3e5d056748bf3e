"""Group-aware splits never leak a group across sides."""

from __future__ import annotations

import pytest

from conftest import compose_config, write_synthetic_dataset
from fungiexp.errors import ConfigError, DataError
from fungiexp.images import ImageRecord, scan_images
from fungiexp.split import check_no_leak, fingerprint, manifest_csv, split_records


@pytest.fixture(scope="module")
def larger_root(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("larger") / "data", source_images=20, patches=2, size=8)


def split_for(root, *overrides):
    cfg = compose_config([f"dataset.root={root}", *overrides]).dataset
    records = scan_images(cfg, root)
    return records, split_records(records, cfg.split)


@pytest.mark.parametrize("level", ["source_image", "sample"])
def test_split_keeps_groups_on_one_side(larger_root, level):
    _, splits = split_for(larger_root, f"dataset.split.group_by={level}")
    sides = {}
    for name, records in splits.items():
        for record in records:
            sides.setdefault(getattr(record, level), set()).add(name)
    assert all(len(names) == 1 for names in sides.values())


def test_split_covers_every_record_once(larger_root):
    records, splits = split_for(larger_root)
    paths = [record.path for side in splits.values() for record in side]
    assert sorted(paths) == sorted(record.path for record in records)


def test_split_is_stratified(larger_root):
    _, splits = split_for(larger_root)
    for name in ("val", "test"):
        assert {record.code for record in splits[name]} == {"H1", "H2", "H3", "H5", "H6"}
    assert len(splits["test"]) == pytest.approx(0.15 * 200, abs=10)


def test_same_seed_gives_same_manifest(larger_root):
    _, first = split_for(larger_root)
    _, second = split_for(larger_root)
    codes = ["H1", "H2", "H3", "H5", "H6"]
    assert fingerprint(manifest_csv(first, codes)) == fingerprint(manifest_csv(second, codes))


def test_other_seed_gives_other_split(larger_root):
    _, first = split_for(larger_root)
    _, second = split_for(larger_root, "dataset.split.seed=7")
    assert [r.path for r in first["test"]] != [r.path for r in second["test"]]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset.split.val_fraction=0"], r"dataset.split.val_fraction: must be between 0 and 1"),
        (["dataset.split.test_fraction=1.5"], r"dataset.split.test_fraction: must be between 0 and 1"),
        (["dataset.split.val_fraction=0.5", "dataset.split.test_fraction=0.5"], r"must be below 1"),
        (["dataset.split.group_by=patient"], r"dataset.split.group_by: must be one of source_image, sample, none"),
    ],
    ids=["val-zero", "test-above-one", "sum-one", "unknown-level"],
)
def test_invalid_split_settings_raise(larger_root, overrides, message):
    with pytest.raises(ConfigError, match=message):
        split_for(larger_root, *overrides)


def test_leak_check_detects_shared_group():
    record = ImageRecord(path="TSH/H1_1a_1.jpg", label=0, code="H1", source_image="H1_1a", sample="H1_1")
    twin = ImageRecord(path="TSH/H1_1a_2.jpg", label=0, code="H1", source_image="H1_1a", sample="H1_1")
    with pytest.raises(DataError, match="level source_image have images in more than one split"):
        check_no_leak({"train": [record], "val": [twin], "test": []}, "source_image")


def test_folds_cover_each_group_once(larger_root):
    codes = ["H1", "H2", "H3", "H5", "H6"]
    tests, vals = set(), []
    for fold in range(5):
        _, splits = split_for(larger_root, "dataset.split.folds=5", f"dataset.split.fold={fold}")
        tests.add(fingerprint(manifest_csv({"train": [], "val": [], "test": splits["test"]}, codes)))
        vals.append({record.source_image for record in splits["val"]})
    assert len(tests) == 1
    for first in range(5):
        for second in range(first + 1, 5):
            assert not vals[first] & vals[second]
    records, splits = split_for(larger_root, "dataset.split.folds=5")
    non_test = {record.source_image for record in records} - {record.source_image for record in splits["test"]}
    assert set().union(*vals) == non_test


def test_fold_out_of_range_raises(larger_root):
    with pytest.raises(ConfigError, match=r"dataset.split.fold: must be in 0..4 for 5 folds; got 5"):
        split_for(larger_root, "dataset.split.folds=5", "dataset.split.fold=5")


def test_manifest_reproduces_split(larger_root, tmp_path):
    codes = ["H1", "H2", "H3", "H5", "H6"]
    _, original = split_for(larger_root, "dataset.split.seed=3")
    manifest = tmp_path / "split.csv"
    manifest.write_text(manifest_csv(original, codes))
    _, reused = split_for(larger_root, f"dataset.split.manifest={manifest}")
    assert manifest_csv(reused, codes) == manifest.read_text()


def test_manifest_with_missing_file_raises(larger_root, tmp_path):
    codes = ["H1", "H2", "H3", "H5", "H6"]
    _, original = split_for(larger_root)
    manifest = tmp_path / "split.csv"
    manifest.write_text(manifest_csv(original, codes) + "TSH/H1_99z_1.jpg,0,H1,H1_99z,H1_99,test\n")
    with pytest.raises(DataError, match=r"1 files listed in manifest .* are not in the data folder \(first: TSH/H1_99z_1.jpg\)"):
        split_for(larger_root, f"dataset.split.manifest={manifest}")


def test_identical_copies_share_a_side(larger_root):
    cfg = compose_config([f"dataset.root={larger_root}"]).dataset
    records = scan_images(cfg, larger_root)
    h1 = sorted({record.source_image for record in records if record.code == "H1"})
    linked = [[f"TSH/{group}_1.jpg" for group in h1]]
    splits = split_records(records, cfg.split, linked)
    sides = {name for name, side in splits.items() for record in side if record.code == "H1"}
    assert len(sides) == 1
