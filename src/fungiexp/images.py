"""Find DeFungi-style images on disk and derive each one's label and groups.

The class code comes from the start of the file name (``H1`` in
``H1_100a_3.jpg``) and falls back to the class folder. The source image
(``H1_100a``) and the sample (``H1_100``) come from a configurable regex, so
that splits can keep every patch of one microscope image on one side.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from fungiexp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff"})
# Files that operating systems and archive tools leave beside images.
SYSTEM_FILE_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class ClassInfo:
    """One class of a data set: its code, folder name and species."""

    code: str
    folder: str
    species: str
    expected_images: int | None = None

    @property
    def display_name(self) -> str:
        """Code and species, as shown on plots and in summaries."""
        return f"{self.code} {self.species}" if self.species else self.code


@dataclass(frozen=True)
class ImageRecord:
    """One image file: its path relative to the data root, label and groups."""

    path: str
    label: int
    code: str
    source_image: str
    sample: str


def class_infos(dataset_cfg: DictConfig) -> list[ClassInfo]:
    """Return the configured classes in label order.

    Raises:
        ConfigError: If ``dataset.classes`` is empty, repeats a code or names a
            code missing from ``dataset.class_info``.
    """
    codes = list(dataset_cfg.classes)
    if len(codes) < 2:
        raise ConfigError(
            "dataset.classes",
            f"needs at least two class codes to train a classifier; got {codes}.",
        )
    duplicates = sorted(code for code, count in Counter(codes).items() if count > 1)
    if duplicates:
        raise ConfigError("dataset.classes", f"lists {duplicates} more than once; list each class once.")

    infos = []
    known = dict(dataset_cfg.class_info)
    for code in codes:
        if code not in known:
            raise ConfigError(
                "dataset.classes",
                f"class {code!r} is not in dataset.class_info; valid codes are {sorted(known)}.",
            )
        entry = known[code]
        infos.append(
            ClassInfo(
                code=str(code),
                folder=str(entry.get("folder", code)),
                species=str(entry.get("species", "")),
                expected_images=entry.get("expected_images"),
            )
        )
    return infos


def is_system_file(path: Path) -> bool:
    """Return True for hidden files and operating-system litter (``.DS_Store``, ``Thumbs.db``, ``._*``)."""
    return path.name.startswith(".") or path.name.lower() in SYSTEM_FILE_NAMES


def is_image_name(path: Path) -> bool:
    """Return True if the file extension is an image extension, in any letter case."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_rgb(path: str | Path, image_size: tuple[int, int]) -> np.ndarray:
    """Read an image of any mode and size as uint8 RGB of shape (height, width, 3).

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are
    converted; 16-bit values are scaled to 8 bits rather than clipped.
    Resizing uses bilinear filtering, which Pillow widens to antialias when
    shrinking.
    """
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # Pillow's convert("RGB") clips 16-bit values at 255 instead of scaling them.
            values = np.asarray(image, dtype=np.float64)
            scale = 65535.0 if values.max(initial=0) > 255 else 255.0
            grey = np.clip(values / scale * 255.0, 0, 255).astype(np.uint8)
            image = Image.fromarray(grey, mode="L")
        rgb = image.convert("RGB")
    height, width = (int(side) for side in image_size)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def find_class_root(root: Path, folders: list[str], max_depth: int = 4) -> Path | None:
    """Return the folder under ``root`` that contains the most of ``folders``.

    Archives wrap the class folders in zero or more extra folders, so the
    search goes down up to ``max_depth`` levels. Returns None if no level
    contains any of them.
    """
    expected = set(folders)
    best, best_hits = None, 0
    frontier = [root]
    for _ in range(max_depth + 1):
        next_frontier = []
        for folder in frontier:
            children = [child for child in sorted(folder.iterdir()) if child.is_dir()]
            hits = sum(child.name in expected for child in children)
            if hits > best_hits:
                best, best_hits = folder, hits
            next_frontier.extend(child for child in children if not child.name.startswith("."))
        frontier = next_frontier
    return best


def scan_images(dataset_cfg: DictConfig, root: Path, exclude: set[str] | frozenset[str] = frozenset()) -> list[ImageRecord]:
    """List the images of the configured classes under ``root``.

    Each configured class folder is searched recursively for files with an
    image extension (case-insensitive). Hidden and system files, and the
    paths in ``exclude`` (relative to the class root, as the data check
    reports them), are left out and counted.

    Raises:
        DataError: If no class folder is found, a class has no images, or file
            names do not match ``dataset.split.group_pattern``.
    """
    infos = class_infos(dataset_cfg)
    class_root = find_class_root(root, [info.folder for info in infos])
    if class_root is None:
        raise DataError(
            f"No class folder ({', '.join(info.folder for info in infos)}) found under {root}. "
            "Point dataset.root at the extracted DeFungi folder, or remove it and set "
            "dataset.source to the downloaded archive so that it is extracted there."
        )

    label_re = _compile(dataset_cfg.label_pattern, "dataset.label_pattern")
    group_re = _compile(dataset_cfg.split.group_pattern, "dataset.split.group_pattern")
    code_to_label = {info.code: index for index, info in enumerate(infos)}

    records: list[ImageRecord] = []
    unmatched: list[str] = []
    relabelled = 0
    foreign = 0
    hidden = 0
    excluded = 0
    for info in infos:
        folder = class_root / info.folder
        if not folder.is_dir():
            raise DataError(
                f"Class folder {folder} for class {info.code} ({info.species}) does not exist. "
                f"Remove {info.code} from dataset.classes or restore the folder."
            )
        files = sorted(path for path in folder.rglob("*") if path.is_file())
        for path in files:
            if is_system_file(path):
                hidden += 1
                continue
            if not is_image_name(path):
                continue
            if str(path.relative_to(class_root)) in exclude:
                excluded += 1
                continue

            code = info.code
            label_match = label_re.match(path.name)
            name_code = label_match.group(1) if label_match else None
            if name_code in code_to_label and name_code != info.code:
                code = name_code
                relabelled += 1
            elif name_code is not None and name_code not in code_to_label:
                foreign += 1

            group_match = group_re.match(path.stem)
            if group_match is None:
                unmatched.append(str(path.relative_to(class_root)))
                continue
            records.append(
                ImageRecord(
                    path=str(path.relative_to(class_root)),
                    label=code_to_label[code],
                    code=code,
                    source_image=_named_group(group_match, "source_image", path.stem),
                    sample=_named_group(group_match, "sample", path.stem),
                )
            )

    if unmatched:
        first_files = ", ".join(unmatched[:5])
        raise DataError(
            f"{len(unmatched)} file names under {class_root} do not match "
            f"dataset.split.group_pattern={dataset_cfg.split.group_pattern!r} (first: {first_files}). "
            "Adapt the pattern to these names, or rename the files."
        )
    if hidden:
        log.warning("Skipped %d hidden and system files under %s", hidden, class_root)
    if excluded:
        log.warning("Left out %d files that the data check flagged", excluded)
    if relabelled:
        log.warning(
            "%d files sit in the folder of another class; their label follows the class code "
            "in the file name (dataset.label_pattern)",
            relabelled,
        )
    if foreign:
        log.warning(
            "%d files carry a class code in their name that is not in dataset.classes; "
            "they keep the class of their folder",
            foreign,
        )

    counts = Counter(record.code for record in records)
    for info in infos:
        if counts[info.code] == 0:
            raise DataError(
                f"Class {info.code} ({info.species}) has no images in {class_root / info.folder}. "
                f"Remove {info.code} from dataset.classes or add its images."
            )
        expected = info.expected_images if dataset_cfg.get("expected_images") is not None else None
        if expected is not None and counts[info.code] != expected:
            log.warning(
                "Class %s has %d images; the published data set has %d",
                info.code,
                counts[info.code],
                expected,
            )
    log.info(
        "Found %d images in %s: %s",
        len(records),
        class_root,
        ", ".join(f"{info.code}={counts[info.code]}" for info in infos),
    )
    return records


def limit_per_class(records: list[ImageRecord], limit: int, group_by: str, seed: int) -> list[ImageRecord]:
    """Keep about ``limit`` images per class, taking whole groups in a seeded order.

    Whole groups are taken so that a reduced data set keeps the grouping that
    the split relies on. A class may end up slightly above ``limit`` by the
    size of its last group.
    """
    import random

    rng = random.Random(seed)
    by_class: dict[int, dict[str, list[ImageRecord]]] = {}
    for record in records:
        by_class.setdefault(record.label, {}).setdefault(group_key(record, group_by), []).append(record)

    selected: list[ImageRecord] = []
    for label in sorted(by_class):
        groups = sorted(by_class[label])
        rng.shuffle(groups)
        count = 0
        for group in groups:
            if count >= limit:
                break
            selected.extend(by_class[label][group])
            count += len(by_class[label][group])
    selected.sort(key=lambda record: record.path)
    return selected


def group_key(record: ImageRecord, group_by: str) -> str:
    """Return the group of ``record`` at the level ``group_by`` names."""
    if group_by == "source_image":
        return record.source_image
    if group_by == "sample":
        return record.sample
    if group_by == "none":
        return record.path
    raise ConfigError(
        "dataset.split.group_by",
        f"must be one of source_image, sample, none; got {group_by!r}.",
    )


def _compile(pattern: str, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ConfigError(key, f"is not a valid regular expression ({error}); got {pattern!r}.") from error


def _named_group(match: re.Match, name: str, fallback: str) -> str:
    value = match.groupdict().get(name)
    return value if value else fallback
