"""Fetching an archive into dataset.root."""

from __future__ import annotations

import zipfile

import pytest

from conftest import compose_config
from fungiexp.errors import ConfigError, DataError
from fungiexp.fetch import ensure_dataset, extract_archive, fetch


@pytest.fixture
def archive(synthetic_root, tmp_path):
    """A zip of the synthetic data set wrapped in one extra folder, as DeFungi ships."""
    path = tmp_path / "defungi.zip"
    with zipfile.ZipFile(path, "w") as bundle:
        for file in sorted(synthetic_root.rglob("*.jpg")):
            bundle.write(file, f"defungi/{file.relative_to(synthetic_root)}")
    return path


def dataset_cfg(root, source, *extra):
    return compose_config([f"dataset.root={root}", f"dataset.source={source}", "dataset.expected_images=null", *extra]).dataset


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_fetch_extracts_class_folders(archive, tmp_path, as_url):
    root = tmp_path / "data" / "defungi"
    source = archive.as_uri() if as_url else str(archive)
    fetch(dataset_cfg(root, source))
    assert sorted(path.name for path in root.iterdir()) == ["BASH", "BBH", "GMA", "SHC", "TSH"]
    assert len(list(root.rglob("*.jpg"))) == 90
    assert [path.name for path in root.parent.iterdir()] == ["defungi"]


def test_fetch_twice_does_nothing(archive, tmp_path, caplog):
    root = tmp_path / "defungi"
    fetch(dataset_cfg(root, archive))
    marker = root / "TSH" / "kept.txt"
    marker.write_text("still here")
    with caplog.at_level("INFO"):
        fetch(dataset_cfg(root, archive))
    assert marker.exists()
    assert "already exists" in caplog.text


def test_sha256_mismatch_raises(archive, tmp_path):
    cfg = dataset_cfg(tmp_path / "d", archive, "dataset.sha256=abc")
    with pytest.raises(DataError, match="dataset.sha256 expects abc"):
        fetch(cfg)
    assert not (tmp_path / "d").exists()


def test_missing_root_without_source_raises(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.root: folder .* does not exist and dataset.source is not set"):
        ensure_dataset(compose_config([f"dataset.root={tmp_path / 'nowhere'}"]).dataset)


def test_missing_archive_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.source: archive .*missing.zip not found"):
        fetch(dataset_cfg(tmp_path / "d", tmp_path / "missing.zip"))


@pytest.mark.parametrize(
    ("member", "message"),
    [("../evil.txt", r"'../evil.txt' leaves the target folder"), ("/tmp/evil.txt", r"'/tmp/evil.txt' has an absolute path")],
    ids=["dot-dot", "absolute"],
)
def test_unsafe_members_are_rejected(tmp_path, member, message):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as bundle:
        bundle.writestr("defungi/TSH/H1_1a_1.jpg", b"x")
        bundle.writestr(member, b"evil")
    target = tmp_path / "out" / "target"
    with pytest.raises(DataError, match=message):
        extract_archive(bad, target)
    assert list(target.iterdir()) == []
    assert not (tmp_path / "out" / "evil.txt").exists()


def test_count_mismatch_raises_and_extracts_nothing(archive, tmp_path):
    cfg = compose_config([f"dataset.root={tmp_path / 'd'}", f"dataset.source={archive}"]).dataset
    with pytest.raises(DataError, match=r"does not have the expected image counts \(total: 90 instead of 9114; H1: 18 instead of 4404"):
        fetch(cfg)
    assert list(tmp_path.iterdir()) == [archive]


def test_interrupted_fetch_leaves_no_data_folder(archive, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fungiexp.fetch.check_counts", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fetch(dataset_cfg(tmp_path / "data" / "defungi", archive))
    assert list((tmp_path / "data").iterdir()) == []
