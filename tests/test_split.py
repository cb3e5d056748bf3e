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
