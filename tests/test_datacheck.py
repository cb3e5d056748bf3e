"""The data check: bad files by kind, the bad-image policy, and the scan cache."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import compose_config, write_synthetic_dataset
from fungiexp.datacheck import apply_bad_image_policy, scan_dataset
from fungiexp.errors import DataError
from fungiexp.images import read_rgb


def save(image: Image.Image, path, format_name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=format_name)


@pytest.fixture
def bad_root(tmp_path):
    """A synthetic data set with one file of every problem kind the check reports."""
    root = write_synthetic_dataset(tmp_path / "bad", source_images=4, patches=2, size=16)
    tsh = root / "TSH"
    (tsh / "H1_20a_1.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 30)).save(jpeg, format="JPEG")
    (tsh / "H1_21a_1.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (tsh / "H1_22a_1.jpg").write_text("not an image")
    save(Image.new("RGBA", (16, 16), (10, 200, 10, 128)), tsh / "H1_23a_1.png", "PNG")
    save(Image.new("L", (16, 16), 90), tsh / "H1_24a_1.jpg", "JPEG")
    save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tsh / "H1_25a_1.jpg", "JPEG")
    save(Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)), tsh / "H1_26a_1.png", "PNG")
    save(Image.new("RGB", (16, 16), (200, 60, 60)), tsh / "H1_27a_1.JPG", "JPEG")
    (tsh / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "NEW").mkdir()
    for path in (root / "BBH").iterdir():
        path.unlink()
    shutil.copy(tsh / "H1_1a_1.jpg", root / "BASH" / "H2_30a_1.jpg")
    return root


def check(root, *extra):
    cfg = compose_config([f"dataset.root={root}", "dataset.expected_images=null", *extra]).dataset
    return scan_dataset(cfg, root)


def paths_of(report, kind):
    return sorted(path for path, _ in report.problems.get(kind, []))


def test_check_reports_each_kind(bad_root):
    report = check(bad_root)
    assert paths_of(report, "zero_byte") == ["TSH/H1_20a_1.jpg"]
    assert paths_of(report, "truncated") == ["TSH/H1_21a_1.jpg"]
    assert paths_of(report, "not_image") == ["TSH/H1_22a_1.jpg"]
    assert paths_of(report, "mode_conversion") == ["TSH/H1_23a_1.png", "TSH/H1_24a_1.jpg", "TSH/H1_25a_1.jpg", "TSH/H1_26a_1.png"]
    assert paths_of(report, "system_file") == ["TSH/.DS_Store"]
    assert paths_of(report, "empty_class_folder") == ["BBH"]
    assert paths_of(report, "unknown_folder") == ["NEW"]
    assert paths_of(report, "label_conflict") == ["BASH/H2_30a_1.jpg", "TSH/H1_1a_1.jpg"]
    assert "TSH/H1_27a_1.JPG" not in {path for items in report.problems.values() for path, _ in items}


def test_check_flags_name_without_class_code(bad_root):
    shutil.copy(bad_root / "TSH" / "H1_2a_1.jpg", bad_root / "GMA" / "H1_40a_1.jpg")
    report = check(bad_root)
    assert "GMA/H1_40a_1.jpg" in paths_of(report, "name_mismatch")


def test_copy_renamed_to_other_class_is_conflict(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ok", source_images=2, patches=1, size=8)
    shutil.copy(root / "GMA" / "H3_1a_1.jpg", root / "GMA" / "H1_996a_1.jpg")
    report = check(root)
    assert paths_of(report, "label_conflict") == ["GMA/H1_996a_1.jpg", "GMA/H3_1a_1.jpg"]
    assert "GMA/H1_996a_1.jpg" in paths_of(report, "name_mismatch")


def test_check_counts_sources_and_samples(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ok", source_images=4, patches=2, size=8)
    report = check(root)
    assert report.classes["H1"].images == 8
    assert report.classes["H1"].source_images == 4
    assert report.classes["H1"].samples == 2
    assert not report.blocking


def test_source_counts_leave_out_uncounted_files(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ok", source_images=4, patches=2, size=8)
    before = check(root).classes
    counts = {code: (stats.images, stats.source_images, stats.samples) for code, stats in before.items()}
    # A copy of an H1 image filed as H6, and a file that is no image.
    shutil.copy(root / "TSH" / "H1_1a_1.jpg", root / "BBH" / "H6_997a_1.jpg")
    (root / "GMA" / "H3_998a_1.jpg").write_text("not an image")

    after = check(root).classes

    assert (after["H6"].images, after["H6"].source_images, after["H6"].samples) == counts["H6"]
    assert (after["H3"].images, after["H3"].source_images, after["H3"].samples) == counts["H3"]
    # The H1 original conflicts with its copy, so one H1 image is not counted; its source image has a second patch.
    assert after["H1"].images == counts["H1"][0] - 1
    assert after["H1"].source_images == counts["H1"][1]


def test_error_policy_lists_files_and_key(bad_root):
    report = check(bad_root, "dataset.classes=[H1,H2,H3,H5]")
    with pytest.raises(DataError, match=r"(?s)zero-byte files: 1.*TSH/H1_20a_1.jpg.*dataset.on_bad_image=skip"):
        apply_bad_image_policy(report, "error")


def test_skip_policy_returns_bad_paths(bad_root):
    report = check(bad_root, "dataset.classes=[H1,H2,H3,H5]")
    skipped = apply_bad_image_policy(report, "skip")
    assert skipped == {
        "TSH/H1_20a_1.jpg",
        "TSH/H1_21a_1.jpg",
        "TSH/H1_22a_1.jpg",
        "TSH/H1_1a_1.jpg",
        "BASH/H2_30a_1.jpg",
    }


def test_skip_policy_still_stops_on_empty_class(bad_root):
    with pytest.raises(DataError, match=r"class folders without images: 1.*\n.*BBH"):
        apply_bad_image_policy(check(bad_root), "skip")


def test_scan_cache_skips_unchanged_files(tmp_path, monkeypatch):
    root = write_synthetic_dataset(tmp_path / "ok", source_images=2, patches=1, size=8)
    cfg = compose_config([f"dataset.root={root}", "dataset.expected_images=null"]).dataset
    scan_dataset(cfg, root, tmp_path / "cache")
    opened = []
    monkeypatch.setattr("fungiexp.datacheck.inspect_file", lambda path: opened.append(path) or {})
    report = scan_dataset(cfg, root, tmp_path / "cache")
    assert opened == []
    assert report.classes["H1"].images == 2

    changed = root / "TSH" / "H1_1a_1.jpg"
    changed.write_bytes(changed.read_bytes() + b"\0")
    monkeypatch.undo()
    report = scan_dataset(cfg, root, tmp_path / "cache")
    assert report.classes["H1"].images == 2


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("L", 90, (90, 90, 90)), ("RGBA", (10, 200, 10, 128), (10, 200, 10)), ("I;16", 65535, (255, 255, 255))],
    ids=["grayscale", "rgba", "16-bit"],
)
def test_read_rgb_converts_modes(tmp_path, mode, value, expected):
    path = tmp_path / "image.png"
    if mode == "I;16":
        Image.fromarray(np.full((10, 12), value, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, (12, 10), value).save(path)
    pixels = read_rgb(path, (5, 6))
    assert pixels.shape == (5, 6, 3)
    assert pixels.dtype == np.uint8
    assert tuple(pixels[2, 3]) == expected


def run_data_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fungiexp", "data", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_data_check_command_exit_status(bad_root, tmp_path):
    completed = run_data_cli("check", f"dataset.root={bad_root}", "dataset.expected_images=null", cwd=tmp_path)
    assert completed.returncode == 1, completed.stderr
    assert "[error] zero-byte files: 1" in completed.stdout
    assert "[error] byte-identical images in more than one class (label conflict): 2" in completed.stdout
    assert "[note] hidden and system files (ignored): 1" in completed.stdout
    assert "tensorflow" not in completed.stderr.lower()


def test_data_check_command_passes_clean_folder(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ok", source_images=2, patches=1, size=8)
    completed = run_data_cli("check", f"dataset.root={root}", "dataset.expected_images=null", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "No problems found." in completed.stdout
    assert re.search(r"H1 +2 +2 +1\n", completed.stdout)


def test_data_fetch_command_is_idempotent(synthetic_root, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "defungi"), "zip", synthetic_root)
    args = ("fetch", f"dataset.root={tmp_path}/data/defungi", f"dataset.source={archive}", "dataset.expected_images=null")
    first = run_data_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "90 images" in first.stdout
    second = run_data_cli(*args, cwd=tmp_path)
    assert second.returncode == 0
    assert "already exists; nothing to fetch" in second.stderr


@pytest.mark.parametrize("subcommand", ["fetch", "check"])
def test_data_subcommand_help(subcommand, tmp_path):
    completed = run_data_cli(subcommand, "--help", cwd=tmp_path)
    assert completed.returncode == 0
    assert "usage: fungiexp data {fetch,check}" in completed.stdout


def test_data_unknown_option_is_named(capsys):
    from fungiexp.datacli import data_main

    assert data_main(["check", "--al"]) == 2
    assert "unknown option '--al'; the only option is --all" in capsys.readouterr().err


def test_data_misspelled_key(capsys):
    from fungiexp.datacli import data_main

    assert data_main(["fetch", "dataset.sourc=archive.zip"]) == 1
    assert "dataset.sourc: unknown key. Did you mean dataset.source?" in capsys.readouterr().err
