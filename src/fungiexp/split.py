"""Group-aware, class-stratified train/validation/test splits.

Patches cut from one microscope image look alike, so a split that puts
patches of one image on both sides scores the model on near-copies of its
training data. Every split here assigns whole groups (source images or
samples) to one side, and is checked for leaks after it is made.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import random
from collections import Counter, defaultdict

from omegaconf import DictConfig

from fungiexp.errors import ConfigError, DataError
from fungiexp.images import ImageRecord, group_key

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def split_records(records: list[ImageRecord], split_cfg: DictConfig) -> dict[str, list[ImageRecord]]:
    """Split ``records`` into train, val and test by whole groups.

    Groups are stratified by their majority class: within each class the
    groups are shuffled with ``split.seed`` and handed to test, then
    validation, until each contains its fraction of that class's images. The
    result is the same for the same files and seed.

    Raises:
        ConfigError: If the fractions are out of range.
        DataError: If a group ends up on two sides.
    """
    val_fraction = float(split_cfg.val_fraction)
    test_fraction = float(split_cfg.test_fraction)
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ConfigError(f"dataset.split.{key}", f"must be between 0 and 1 (exclusive); got {value}.")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            "dataset.split",
            f"val_fraction + test_fraction must be below 1 to leave training images; "
            f"got {val_fraction} + {test_fraction}.",
        )
    group_by = str(split_cfg.group_by)
    if group_by == "none":
        log.warning(
            "dataset.split.group_by=none splits single patches: patches of one microscope image "
            "land on both sides, which inflates every score"
        )

    members: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        members[group_key(record, group_by)].append(record)

    groups_by_class: dict[int, list[str]] = defaultdict(list)
    for group, group_records in members.items():
        majority = Counter(record.label for record in group_records).most_common(1)[0][0]
        groups_by_class[majority].append(group)

    rng = random.Random(int(split_cfg.seed))
    side_of_group: dict[str, str] = {}
    for label in sorted(groups_by_class):
        groups = sorted(groups_by_class[label])
        rng.shuffle(groups)
        total = sum(len(members[group]) for group in groups)
        targets = {"test": test_fraction * total, "val": val_fraction * total}
        filled = {"test": 0, "val": 0}
        for group in groups:
            size = len(members[group])
            side = "train"
            for candidate in ("test", "val"):
                # Take the group if that brings this side closer to its target,
                # and always give each side at least one group when there is one left.
                before = abs(targets[candidate] - filled[candidate])
                after = abs(targets[candidate] - filled[candidate] - size)
                if after < before or (filled[candidate] == 0 and targets[candidate] > 0 and len(groups) >= 3):
                    side = candidate
                    break
            if side != "train":
                filled[side] += size
            side_of_group[group] = side
        if len(groups) < 3:
            log.warning(
                "Class label %d has only %d groups at level %s; some splits get none of its images",
                label,
                len(groups),
                group_by,
            )

    splits: dict[str, list[ImageRecord]] = {name: [] for name in SPLITS}
    for group, group_records in members.items():
        splits[side_of_group[group]].extend(group_records)
    for name in SPLITS:
        splits[name].sort(key=lambda record: record.path)

    check_no_leak(splits, group_by)
    return splits


def check_no_leak(splits: dict[str, list[ImageRecord]], group_by: str) -> None:
    """Raise DataError if a source image or sample has images on two sides.

    With ``group_by=none`` only the patch level is checked, since groups
    are allowed to cross sides there by choice.
    """
    if group_by == "none":
        levels = ["path"]
    elif group_by == "source_image":
        levels = ["source_image"]
    else:
        levels = ["source_image", "sample"]
    for level in levels:
        sides_of: dict[str, set[str]] = defaultdict(set)
        for name, records in splits.items():
            for record in records:
                sides_of[getattr(record, level)].add(name)
        leaked = sorted(group for group, sides in sides_of.items() if len(sides) > 1)
        if leaked:
            raise DataError(
                f"{len(leaked)} groups at level {level} have images in more than one split "
                f"(first: {', '.join(leaked[:5])}). This is a bug in the split; please report it."
            )


def manifest_csv(splits: dict[str, list[ImageRecord]], class_codes: list[str]) -> str:
    """Return the split as CSV text: path, label, class code, source image, sample, split."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "code", "source_image", "sample", "split"])
    for name in SPLITS:
        for record in splits[name]:
            writer.writerow([record.path, record.label, class_codes[record.label], record.source_image, record.sample, name])
    return buffer.getvalue()


def fingerprint(manifest: str) -> str:
    """Return the sha256 of a split manifest, which identifies the exact split."""
    return hashlib.sha256(manifest.encode("utf-8")).hexdigest()


def class_counts(splits: dict[str, list[ImageRecord]], class_codes: list[str]) -> dict[str, dict[str, int]]:
    """Return the number of images per split and class code."""
    counts = {}
    for name in SPLITS:
        per_class = Counter(record.label for record in splits[name])
        counts[name] = {code: per_class.get(label, 0) for label, code in enumerate(class_codes)}
    return counts
