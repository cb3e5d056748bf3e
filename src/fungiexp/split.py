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
from pathlib import Path

from omegaconf import DictConfig

from fungiexp.errors import ConfigError, DataError, SourceNotFoundError
from fungiexp.images import ImageRecord, group_key
from fungiexp.validate import check_split

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def split_records(
    records: list[ImageRecord], split_cfg: DictConfig, linked_paths: list[list[str]] = ()
) -> dict[str, list[ImageRecord]]:
    """Split ``records`` into train, val and test by whole groups.

    ``linked_paths`` lists sets of paths that must share a side, such as
    byte-identical copies filed under different source images; their
    groups are merged before splitting.

    With ``split.manifest`` set, the split is read from that file exactly.
    Otherwise groups are stratified by their majority class: within each
    class the groups are shuffled with ``split.seed`` and handed to test,
    then validation, until each contains its fraction of that class's images.
    With ``split.folds`` set, the test split is chosen the same way and the
    remaining groups are divided into that many stratified folds, of which
    fold ``split.fold`` is the validation split. The result is the same for
    the same files and settings.

    Raises:
        ConfigError: If fractions or fold settings are out of range.
        DataError: If a manifest does not match the files, or a group ends
            up on two sides.
    """
    check_split(split_cfg)
    group_by = str(split_cfg.group_by)
    if split_cfg.get("manifest"):
        splits = splits_from_manifest(records, Path(str(split_cfg.manifest)))
        check_no_leak(splits, group_by)
        return splits

    val_fraction = float(split_cfg.val_fraction)
    test_fraction = float(split_cfg.test_fraction)
    folds = split_cfg.get("folds")
    if folds is not None:
        folds, fold = int(folds), int(split_cfg.fold)
    if group_by == "none":
        log.warning(
            "dataset.split.group_by=none splits single patches: patches of one microscope image "
            "land on both sides, which inflates every score"
        )

    merged = _merge_linked_groups(records, group_by, linked_paths)
    members: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        members[merged[group_key(record, group_by)]].append(record)
    majority = {
        group: Counter(record.label for record in group_records).most_common(1)[0][0]
        for group, group_records in members.items()
    }
    # With folds, validation comes from the folds, so the first pass fills only the test split.
    fractions = {"test": test_fraction, "val": 0.0 if folds is not None else val_fraction}
    side_of_group = _assign_groups(members, majority, fractions, int(split_cfg.seed), group_by)
    if folds is not None:
        rest = sorted(group for group, side in side_of_group.items() if side == "train")
        for group in _fold_groups(rest, members, majority, folds, fold, int(split_cfg.seed)):
            side_of_group[group] = "val"

    splits: dict[str, list[ImageRecord]] = {name: [] for name in SPLITS}
    for group, group_records in members.items():
        splits[side_of_group[group]].extend(group_records)
    for name in SPLITS:
        splits[name].sort(key=lambda record: record.path)

    check_no_leak(splits, group_by)
    return splits


def _merge_linked_groups(records: list[ImageRecord], group_by: str, linked_paths) -> dict[str, str]:
    """Map each group to a representative so that groups sharing a linked set become one."""
    parent = {group_key(record, group_by): group_key(record, group_by) for record in records}

    def find(group: str) -> str:
        while parent[group] != group:
            parent[group] = parent[parent[group]]
            group = parent[group]
        return group

    group_of_path = {record.path: group_key(record, group_by) for record in records}
    merges = 0
    for paths in linked_paths:
        groups = sorted({find(group_of_path[path]) for path in paths if path in group_of_path})
        for other in groups[1:]:
            parent[find(other)] = find(groups[0])
            merges += 1
    if merges:
        log.info("Merged %d groups that share byte-identical images, so that copies stay on one side", merges)
    return {group: find(group) for group in parent}


def _assign_groups(members, majority, fractions, seed: int, group_by: str) -> dict[str, str]:
    groups_by_class: dict[int, list[str]] = defaultdict(list)
    for group, label in majority.items():
        groups_by_class[label].append(group)

    rng = random.Random(seed)
    side_of_group: dict[str, str] = {}
    for label in sorted(groups_by_class):
        groups = sorted(groups_by_class[label])
        rng.shuffle(groups)
        total = sum(len(members[group]) for group in groups)
        targets = {side: fraction * total for side, fraction in fractions.items()}
        filled = {side: 0 for side in fractions}
        for group in groups:
            size = len(members[group])
            side = "train"
            for candidate in ("test", "val"):
                # Take the group if that brings this side closer to its target,
                # and give each side at least one group when the class has three or more.
                before = abs(targets[candidate] - filled[candidate])
                after = abs(targets[candidate] - filled[candidate] - size)
                first = filled[candidate] == 0 and targets[candidate] > 0 and len(groups) >= 3
                if after < before or first:
                    side = candidate
                    break
            if side != "train":
                filled[side] += size
            side_of_group[group] = side
        if len(groups) < 3:
            code = members[groups[0]][0].code if groups else str(label)
            log.warning(
                "Class %s has only %d groups at level %s; some splits get none of its images",
                code,
                len(groups),
                group_by,
            )
    return side_of_group


def _fold_groups(groups: list[str], members, majority, folds: int, fold: int, seed: int) -> list[str]:
    """Return the groups of validation fold ``fold`` among ``groups``, stratified by class."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = [majority[group] for group in groups for _ in members[group]]
    group_ids = [group for group in groups for _ in members[group]]
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    indices = list(splitter.split(group_ids, labels, groups=group_ids))[fold][1]
    return sorted({group_ids[index] for index in indices})


def splits_from_manifest(records: list[ImageRecord], path: Path) -> dict[str, list[ImageRecord]]:
    """Rebuild a split from a manifest that an earlier run wrote.

    Raises:
        SourceNotFoundError: If the manifest file does not exist.
        DataError: If files of the manifest are missing, their class changed,
            or a split name is invalid.
    """
    if not path.is_file():
        raise SourceNotFoundError(
            f"dataset.split.manifest: file {path} not found. Give the split.csv of an earlier run, "
            "or set dataset.split.manifest=null to split anew."
        )
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    by_path = {record.path: record for record in records}
    missing = [row["path"] for row in rows if row["path"] not in by_path]
    if missing:
        raise DataError(
            f"{len(missing)} files listed in manifest {path} are not in the data folder "
            f"(first: {', '.join(missing[:5])}). Use the data set the manifest was made from."
        )
    changed = [row["path"] for row in rows if by_path[row["path"]].code != row["code"]]
    if changed:
        raise DataError(
            f"{len(changed)} files have another class than in manifest {path} "
            f"(first: {', '.join(changed[:5])}). Check dataset.classes and the file names."
        )
    invalid = sorted({row["split"] for row in rows} - set(SPLITS))
    if invalid:
        raise DataError(f"Manifest {path} has invalid split names {invalid}; valid names are {', '.join(SPLITS)}.")

    splits: dict[str, list[ImageRecord]] = {name: [] for name in SPLITS}
    for row in rows:
        splits[row["split"]].append(by_path[row["path"]])
    for name in SPLITS:
        splits[name].sort(key=lambda record: record.path)
    left_out = len(records) - len(rows)
    if left_out:
        log.warning("%d images in the data folder are not in manifest %s and are left out", left_out, path)
    log.info("Split read from manifest %s", path)
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
