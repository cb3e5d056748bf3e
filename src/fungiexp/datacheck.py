"""Scan a data folder for files that would break or bias training.

The scan opens every image with Pillow, hashes its bytes, and reports
problems grouped by kind. Results are cached per file (path, size and
modification time), so a second scan of an unchanged folder only reads the
directory listing. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from fungiexp.errors import ConfigError, DataError
from fungiexp.images import class_infos, find_class_root, is_image_name, is_system_file

log = logging.getLogger(__name__)

CACHE_VERSION = 1
ON_BAD_IMAGE = ("error", "skip")

# Each kind of problem: whether it stops a run under on_bad_image=error, and its description.
PROBLEM_KINDS = {
    "zero_byte": (True, "zero-byte files"),
    "not_image": (True, "files with an image extension that are not images"),
    "truncated": (True, "truncated images"),
    "unreadable": (True, "unreadable images"),
    "label_conflict": (True, "byte-identical images in more than one class (label conflict)"),
    "empty_class_folder": (True, "class folders without images"),
    "missing_class_folder": (True, "configured classes without a folder"),
    "duplicate_in_class": (False, "byte-identical images within one class"),
    "name_mismatch": (False, "files whose name does not carry their folder's class code"),
    "mode_conversion": (False, "images converted to RGB (grayscale, palette, alpha, CMYK, 16-bit)"),
    "system_file": (False, "hidden and system files (ignored)"),
    "other_file": (False, "files without an image extension (ignored)"),
    "unknown_folder": (False, "folders that match no class in dataset.class_info (ignored)"),
}
# Problems that on_bad_image=skip handles by leaving the file out.
SKIPPABLE = frozenset({"zero_byte", "not_image", "truncated", "unreadable", "label_conflict"})


@dataclass
class ClassStats:
    """Counts of one class: images, source images and samples."""

    images: int = 0
    source_images: int = 0
    samples: int = 0


@dataclass
class ScanReport:
    """Result of a data scan: per-class counts, and problems by kind as lists of (path, detail)."""

    class_root: Path
    classes: dict[str, ClassStats] = field(default_factory=dict)
    problems: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    # Sets of byte-identical image paths within one class; splits keep each set on one side.
    duplicate_sets: list[list[str]] = field(default_factory=list)
    # sha256 of each usable image, by path relative to the class root.
    file_hashes: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, path: str, detail: str = "") -> None:
        """Record one problem of ``kind`` on ``path``."""
        self.problems[kind].append((path, detail))

    @property
    def blocking(self) -> dict[str, list[tuple[str, str]]]:
        """Problems that stop a run under ``dataset.on_bad_image=error``."""
        return {kind: items for kind, items in self.problems.items() if items and PROBLEM_KINDS[kind][0]}

    def skipped_paths(self) -> set[str]:
        """Paths, relative to the class root, that ``on_bad_image=skip`` leaves out."""
        return {path for kind in SKIPPABLE for path, _ in self.problems.get(kind, [])}


def scan_dataset(dataset_cfg: DictConfig, root: Path, cache_dir: Path | None = None) -> ScanReport:
    """Scan the configured class folders under ``root`` and return the report.

    Args:
        dataset_cfg: The ``dataset`` config.
        root: The data folder (``dataset.root``).
        cache_dir: Folder for the per-file cache; None scans without a cache.

    Raises:
        DataError: If ``root`` contains none of the configured class folders.
    """
    infos = class_infos(dataset_cfg)
    class_root = find_class_root(root, [info.folder for info in infos])
    if class_root is None:
        raise DataError(
            f"No class folder ({', '.join(info.folder for info in infos)}) found under {root}. "
            "Point dataset.root at the extracted data set."
        )
    report = ScanReport(class_root=class_root)
    cache_path = _cache_path(cache_dir, class_root)
    cache = _load_cache(cache_path)
    fresh_cache: dict[str, dict] = {}

    known_folders = {str(entry.get("folder", code)) for code, entry in dataset_cfg.class_info.items()}
    for child in sorted(class_root.iterdir()):
        if child.is_dir() and child.name not in known_folders and not is_system_file(child):
            report.add("unknown_folder", child.name)

    label_re = re.compile(str(dataset_cfg.label_pattern))
    group_re = re.compile(str(dataset_cfg.split.group_pattern))
    hashes: dict[str, list[tuple[str, str]]] = defaultdict(list)
    # Class code, source image and sample of each counted file, by relative path.
    groups: dict[str, tuple[str, str, str]] = {}
    configured = {info.code for info in infos}
    for info in infos:
        report.classes.setdefault(info.code, ClassStats())
    for info in infos:
        folder = class_root / info.folder
        if not folder.is_dir():
            report.add("missing_class_folder", info.folder, f"class {info.code}")
            continue
        usable = 0
        for path in sorted(folder.rglob("*")):
            if path.is_dir():
                continue
            relative = str(path.relative_to(class_root))
            if is_system_file(path):
                report.add("system_file", relative)
                continue
            if not is_image_name(path):
                report.add("other_file", relative)
                continue
            result = _inspect_cached(path, relative, cache, fresh_cache)
            if result["problem"]:
                report.add(result["problem"], relative, result["detail"])
                continue
            if result["mode"] != "RGB":
                report.add("mode_conversion", relative, result["mode"])
            label_match = label_re.match(path.name)
            name_code = label_match.group(1) if label_match else None
            if name_code != info.code:
                report.add("name_mismatch", relative, f"folder class {info.code}, name code {name_code or 'none'}")
            # Training labels a file by the class code in its name when that class is configured.
            code = name_code if name_code in configured else info.code
            hashes[result["sha256"]].append((relative, code))
            report.file_hashes[relative] = result["sha256"]
            report.classes.setdefault(code, ClassStats()).images += 1
            usable += 1
            group_match = group_re.match(path.stem)
            if group_match:
                groups[relative] = (
                    code,
                    group_match.groupdict().get("source_image") or path.stem,
                    group_match.groupdict().get("sample") or path.stem,
                )
        if usable == 0:
            report.add("empty_class_folder", info.folder, f"class {info.code}")

    for copies in hashes.values():
        if len(copies) < 2:
            continue
        conflict = len({code for _, code in copies}) > 1
        kind = "label_conflict" if conflict else "duplicate_in_class"
        paths = [path for path, _ in copies]
        if not conflict:
            report.duplicate_sets.append(paths)
        for path, code in copies:
            report.add(kind, path, "same bytes as " + ", ".join(other for other in paths if other != path))
            if conflict:
                # Neither label of a conflicting copy can be trusted, so it is not counted as an image.
                report.classes[code].images -= 1
                groups.pop(path, None)

    # Source images and samples are counted over the same files as the images, under the same class code.
    sources, samples = defaultdict(set), defaultdict(set)
    for code, source, sample in groups.values():
        sources[code].add(source)
        samples[code].add(sample)
    for code, stats in report.classes.items():
        stats.source_images, stats.samples = len(sources[code]), len(samples[code])

    _save_cache(cache_path, fresh_cache)
    return report


def apply_bad_image_policy(report: ScanReport, policy: str) -> set[str]:
    """Enforce ``dataset.on_bad_image`` on a scan and return the paths to leave out.

    Raises:
        ConfigError: For an unknown policy.
        DataError: Under ``error``, if the report has blocking problems; under
            ``skip``, if a whole class folder is missing or empty.
    """
    if policy not in ON_BAD_IMAGE:
        raise ConfigError("dataset.on_bad_image", f"must be one of {', '.join(ON_BAD_IMAGE)}; got {policy!r}.")
    blocking = report.blocking
    unskippable = {kind: items for kind, items in blocking.items() if kind not in SKIPPABLE}
    if policy == "error" and blocking or unskippable:
        lines = [f"Data check of {report.class_root} found problems that stop the run:"]
        for kind, items in (blocking if policy == "error" else unskippable).items():
            lines.append(f"  {PROBLEM_KINDS[kind][1]}: {len(items)}")
            lines.extend(f"    {path}{f' ({detail})' if detail else ''}" for path, detail in items[:20])
            if len(items) > 20:
                lines.append(f"    ... and {len(items) - 20} more")
        if unskippable:
            lines.append("Restore the class folders or remove those classes from dataset.classes.")
        else:
            lines.append("Fix or remove these files, or set dataset.on_bad_image=skip to train without them.")
        raise DataError("\n".join(lines))

    skipped = report.skipped_paths()
    for kind in sorted(SKIPPABLE):
        for path, detail in report.problems.get(kind, []):
            log.warning("Skipping %s: %s%s", path, PROBLEM_KINDS[kind][1], f" ({detail})" if detail else "")
    if skipped:
        log.warning("dataset.on_bad_image=skip left out %d files", len(skipped))
    return skipped


def format_report(report: ScanReport, limit: int | None = 10) -> str:
    """Format a scan as text: a table of classes, then problems grouped by kind.

    ``limit`` caps the files listed per kind; None lists all of them.
    """
    lines = [f"Data folder: {report.class_root}", "", f"  {'class':<6} {'images':>7} {'source images':>14} {'samples':>8}"]
    for code, stats in report.classes.items():
        lines.append(f"  {code:<6} {stats.images:>7} {stats.source_images:>14} {stats.samples:>8}")
    total = sum(stats.images for stats in report.classes.values())
    lines.append(f"  {'total':<6} {total:>7}")
    lines.append("")
    found = {kind: items for kind, items in report.problems.items() if items}
    if not found:
        lines.append("No problems found.")
        return "\n".join(lines)
    lines.append("Problems:")
    for kind in PROBLEM_KINDS:
        items = found.get(kind)
        if not items:
            continue
        severity = "error" if PROBLEM_KINDS[kind][0] else "note"
        lines.append(f"  [{severity}] {PROBLEM_KINDS[kind][1]}: {len(items)}")
        shown = items if limit is None else items[:limit]
        lines.extend(f"      {path}{f' ({detail})' if detail else ''}" for path, detail in shown)
        if len(items) > len(shown):
            lines.append(f"      ... and {len(items) - len(shown)} more (`fungiexp data check --all` lists them)")
    return "\n".join(lines)


def inspect_file(path: Path) -> dict:
    """Open one file with Pillow and return its sha256, mode and problem kind (or None)."""
    data = path.read_bytes()
    result = {"sha256": hashlib.sha256(data).hexdigest(), "mode": None, "problem": None, "detail": ""}
    if not data:
        result["problem"] = "zero_byte"
        return result
    try:
        with Image.open(path) as image:
            result["mode"] = image.mode
            image.load()
    except UnidentifiedImageError:
        result["problem"] = "not_image"
    except (OSError, SyntaxError, ValueError) as error:
        result["problem"] = "truncated" if "truncated" in str(error).lower() else "unreadable"
        result["detail"] = str(error)
    return result


def _inspect_cached(path: Path, relative: str, cache: dict, fresh_cache: dict) -> dict:
    stat = path.stat()
    key = [stat.st_size, stat.st_mtime_ns]
    entry = cache.get(relative)
    if entry is None or entry.get("key") != key:
        entry = {"key": key, **inspect_file(path)}
    fresh_cache[relative] = entry
    return entry


def _cache_path(cache_dir: Path | None, class_root: Path) -> Path | None:
    if cache_dir is None:
        return None
    digest = hashlib.sha256(str(class_root.resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"scan-{digest}.json"


def _load_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        log.warning("Ignoring unreadable scan cache %s: %s", path, error)
        return {}
    return content.get("files", {}) if content.get("version") == CACHE_VERSION else {}


def _save_cache(path: Path | None, files: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"version": CACHE_VERSION, "files": files}))
    temporary.replace(path)

