"""Data preparation shared by training and the `fungiexp data` commands: fetch, check, scan, split."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from fungiexp.datacheck import PROBLEM_KINDS, SKIPPABLE, ScanReport, apply_bad_image_policy, scan_dataset
from fungiexp.errors import DataError
from fungiexp.fetch import ensure_dataset
from fungiexp.images import ClassInfo, ImageRecord, class_infos, limit_per_class, scan_images
from fungiexp.split import SPLITS, class_counts, manifest_csv, split_records

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """The images of one run, split, with what the data check found."""

    root: Path
    infos: list[ClassInfo]
    splits: dict[str, list[ImageRecord]]
    counts: dict[str, dict[str, int]]
    manifest: str
    report: ScanReport
    skipped: set[str]

    @property
    def codes(self) -> list[str]:
        """Class codes in label order."""
        return [info.code for info in self.infos]

    def content_fingerprint(self) -> str:
        """Return a sha256 over the path and content hash of every image in the split.

        Unlike the manifest's hash, it changes when the bytes of any image change.
        """
        digest = hashlib.sha256()
        for name in SPLITS:
            for record in self.splits[name]:
                digest.update(f"{name}\t{record.path}\t{self.report.file_hashes.get(record.path, '')}\n".encode())
        return digest.hexdigest()

    def skipped_csv(self) -> str:
        """Return the skipped files as CSV text: path, kind, detail."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "kind", "detail"])
        for kind in sorted(SKIPPABLE):
            for path, detail in self.report.problems.get(kind, []):
                writer.writerow([path, kind, detail])
        return buffer.getvalue()


def prepare_data(dataset_cfg: DictConfig) -> PreparedData:
    """Fetch if needed, check, scan and split the data set that ``dataset`` describes.

    Raises:
        ConfigError: For invalid dataset settings.
        DataError: For data problems that ``dataset.on_bad_image`` does not allow,
            or a split that leaves a side empty.
    """
    infos = class_infos(dataset_cfg)
    root = ensure_dataset(dataset_cfg)

    log.info("Checking the images in %s", root)
    report = scan_dataset(dataset_cfg, root, Path(str(dataset_cfg.cache_dir)) if dataset_cfg.get("cache_dir") else None)
    _log_notes(report)
    skipped = apply_bad_image_policy(report, str(dataset_cfg.on_bad_image))

    records = scan_images(dataset_cfg, root, exclude=skipped)
    if dataset_cfg.limit_per_class:
        records = limit_per_class(
            records, int(dataset_cfg.limit_per_class), str(dataset_cfg.split.group_by), int(dataset_cfg.split.seed)
        )
        log.info("dataset.limit_per_class=%s keeps %d images", dataset_cfg.limit_per_class, len(records))

    splits = split_records(records, dataset_cfg.split, report.duplicate_sets)
    codes = [info.code for info in infos]
    counts = class_counts(splits, codes)
    for name in SPLITS:
        if not splits[name]:
            raise DataError(
                f"The {name} split is empty ({len(records)} images in all). Use more images "
                "(dataset.limit_per_class) or larger dataset.split fractions."
            )
        per_class = ", ".join(f"{code}={count}" for code, count in counts[name].items())
        log.info("%s split: %d images (%s)", name, len(splits[name]), per_class)
        absent = [code for code, count in counts[name].items() if count == 0]
        if absent:
            log.warning(
                "The %s split has no images of class %s, so its scores for that class are undefined; "
                "use more images (dataset.limit_per_class) or a finer dataset.split.group_by",
                name,
                ", ".join(absent),
            )
    return PreparedData(root, infos, splits, counts, manifest_csv(splits, codes), report, skipped)


def _log_notes(report: ScanReport) -> None:
    for kind, items in report.problems.items():
        if items and not PROBLEM_KINDS[kind][0] and kind not in ("system_file", "other_file"):
            log.warning("Data check: %d %s (first: %s)", len(items), PROBLEM_KINDS[kind][1], items[0][0])
