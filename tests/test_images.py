"""Finding images, labels and groups on disk."""

from __future__ import annotations

import shutil

import pytest

from conftest import compose_config
from fungiexp.errors import ConfigError, DataError
from fungiexp.images import class_infos, find_class_root, limit_per_class, scan_images


def dataset_cfg(root, *extra):
    return compose_config([f"dataset.root={root}", *extra]).dataset


def test_scan_labels_and_groups(synthetic_root):
    records = scan_images(dataset_cfg(synthetic_root), synthetic_root)
    assert len(records) == 5 * 6 * 3
    first = next(record for record in records if record.path.endswith("H1_1a_1.jpg"))
    assert first.code == "H1"
    assert first.label == 0
    assert first.source_image == "H1_1a"
    assert first.sample == "H1_1"


def test_scan_takes_subset_of_classes(synthetic_root):
    records = scan_images(dataset_cfg(synthetic_root, "dataset=defungi_h123"), synthetic_root)
    assert {record.code for record in records} == {"H1", "H2", "H3"}


def test_scan_finds_class_folders_inside_wrappers(synthetic_root, tmp_path):
    wrapped = tmp_path / "download" / "DeFungi"
    shutil.copytree(synthetic_root, wrapped)
    assert find_class_root(tmp_path, ["TSH", "BASH"]) == wrapped
    assert len(scan_images(dataset_cfg(tmp_path), tmp_path)) == 90


def test_label_follows_code_in_file_name(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    shutil.move(root / "TSH" / "H1_1a_1.jpg", root / "BASH" / "H1_1a_1.jpg")
    records = scan_images(dataset_cfg(root), root)
    moved = next(record for record in records if record.path.endswith("H1_1a_1.jpg"))
    assert moved.code == "H1"


def test_name_without_group_raises(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    shutil.copy(root / "TSH" / "H1_1a_1.jpg", root / "TSH" / "photo.jpg")
    with pytest.raises(DataError, match=r"do not match dataset.split.group_pattern.*TSH/photo.jpg"):
        scan_images(dataset_cfg(root), root)


def test_missing_class_folders_raise(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No class folder"):
        scan_images(dataset_cfg(tmp_path / "empty"), tmp_path / "empty")


def test_class_without_images_raises(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    for path in (root / "GMA").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="Class H3 .* has no images"):
        scan_images(dataset_cfg(root), root)


def test_unknown_class_code_raises(synthetic_root):
    with pytest.raises(ConfigError, match=r"dataset.classes: class 'H4' is not in dataset.class_info"):
        class_infos(dataset_cfg(synthetic_root, "dataset.classes=[H1,H4]"))


def test_limit_per_class_keeps_whole_groups(synthetic_root):
    records = scan_images(dataset_cfg(synthetic_root), synthetic_root)
    kept = limit_per_class(records, 5, "source_image", seed=1)
    for code in ("H1", "H2", "H3", "H5", "H6"):
        in_class = [record for record in kept if record.code == code]
        assert len(in_class) == 6
    kept_groups = {record.source_image for record in kept}
    assert all(record in kept for record in records if record.source_image in kept_groups)
