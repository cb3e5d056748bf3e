"""Fetch a data set archive into ``dataset.root``.

The archive comes from an https:// URL (downloaded), a file:// URL or a local
path. Extraction goes to a temporary folder beside the target and is renamed
into place only when complete, so an interrupted fetch leaves no half-filled
data folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from omegaconf import DictConfig

from fungiexp.errors import ConfigError, DataError, SourceNotFoundError
from fungiexp.images import class_infos, find_class_root, is_image_name, is_system_file

log = logging.getLogger(__name__)

_DOWNLOAD_CHUNK = 1 << 20


def ensure_dataset(dataset_cfg: DictConfig) -> Path:
    """Return ``dataset.root``, fetching ``dataset.source`` into it when it is missing.

    Raises:
        ConfigError: If the root is missing and no source is configured.
        DataError: If the archive cannot be read or contains no class folders.
    """
    root = Path(dataset_cfg.root)
    if root.exists():
        return root
    if not dataset_cfg.source:
        raise ConfigError(
            "dataset.root",
            f"folder {root} does not exist and dataset.source is not set. Download DeFungi "
            "(UCI data set 773) and set dataset.source to the archive path or URL, "
            "for example dataset.source=../shared/data/defungi.zip, or set dataset.root "
            "to an extracted copy.",
        )
    fetch(dataset_cfg)
    return root


def fetch(dataset_cfg: DictConfig) -> Path:
    """Download or copy ``dataset.source`` and extract its class folders into ``dataset.root``.

    Does nothing if the root already exists.
    """
    root = Path(dataset_cfg.root)
    if root.exists():
        log.info("Data folder %s already exists; nothing to fetch", root)
        return root

    source = str(dataset_cfg.source)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_fetches(root)
    with tempfile.TemporaryDirectory(prefix=f".{root.name}.fetch-{os.getpid()}-", dir=root.parent) as work:
        work_dir = Path(work)
        archive = _local_archive(source, work_dir)
        if dataset_cfg.get("sha256"):
            _check_sha256(archive, str(dataset_cfg.sha256))

        extracted = work_dir / "extracted"
        extract_archive(archive, extracted)
        folders = [info.folder for info in class_infos(dataset_cfg)]
        class_root = find_class_root(extracted, folders)
        if class_root is None:
            nested = sorted(extracted.rglob("*.zip"))
            if len(nested) == 1:
                # Some downloads wrap the data set archive in another archive.
                log.info("Extracting nested archive %s", nested[0].name)
                inner = work_dir / "inner"
                extract_archive(nested[0], inner)
                class_root = find_class_root(inner, folders)
        if class_root is None:
            raise DataError(
                f"Archive {source} contains none of the class folders {folders}. "
                "Check that dataset.source points at the DeFungi archive."
            )
        check_counts(dataset_cfg, class_root, source)
        try:
            os.replace(class_root, root)
        except OSError:
            if not root.is_dir():
                raise
            # Another process (a parallel job of a sweep) finished the same fetch first.
            log.info("Data folder %s appeared during the fetch; keeping it", root)
            return root
    log.info("Extracted %s into %s", source, root)
    return root


def _remove_abandoned_fetches(root: Path) -> None:
    """Delete the work folders of earlier fetches into ``root`` whose process no longer runs.

    A killed fetch cannot clean up after itself; its folder name carries its process id.
    """
    for folder in root.parent.glob(f".{root.name}.fetch-*-*"):
        try:
            pid = int(folder.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _process_exists(pid):
            log.info("Removing %s, left by an interrupted fetch", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_counts(dataset_cfg: DictConfig, class_root: Path, source: str) -> None:
    """Compare image counts per class folder with ``dataset.expected_images`` and ``class_info``.

    Raises:
        DataError: If the total or a class count differs; null
            ``dataset.expected_images`` skips the check.
    """
    expected_total = dataset_cfg.get("expected_images")
    if expected_total is None:
        return
    counts = {}
    for code, entry in dataset_cfg.class_info.items():
        folder = class_root / str(entry.get("folder", code))
        files = folder.rglob("*") if folder.is_dir() else []
        counts[code] = sum(1 for path in files if path.is_file() and is_image_name(path) and not is_system_file(path))
    differences = [
        f"{code}: {counts[code]} instead of {entry.expected_images}"
        for code, entry in dataset_cfg.class_info.items()
        if entry.get("expected_images") is not None and counts[code] != entry.expected_images
    ]
    total = sum(counts.values())
    if total != expected_total:
        differences.insert(0, f"total: {total} instead of {expected_total}")
    if differences:
        raise DataError(
            f"Archive {source} does not have the expected image counts ({'; '.join(differences)}). "
            "Download it again, or set dataset.expected_images=null to accept another copy."
        )
    log.info("Archive %s has the expected %d images", source, total)


def extract_archive(archive: Path, target: Path) -> None:
    """Extract a zip or tar archive into ``target`` after checking every member.

    Raises:
        DataError: If a member would land outside ``target`` (absolute path,
            ``..`` component or link), naming the member; nothing is extracted.
    """
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                _check_member_path(info.filename, archive)
                mode = (info.external_attr >> 16) & 0o170000
                if mode == 0o120000:
                    raise DataError(f"Archive {archive} member {info.filename!r} is a symbolic link; rejected the archive, nothing was extracted.")
            bundle.extractall(target)
        return
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as bundle:
            members = bundle.getmembers()
            for member in members:
                _check_member_path(member.name, archive)
                if member.issym() or member.islnk():
                    raise DataError(f"Archive {archive} member {member.name!r} is a link; rejected the archive, nothing was extracted.")
            bundle.extractall(target, filter="data")
        return
    raise DataError(f"{archive} is neither a zip nor a tar archive. Point dataset.source at the DeFungi zip file.")


def _check_member_path(name: str, archive: Path) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"Archive {archive} member {name!r} has an absolute path; rejected the archive, nothing was extracted.")
    if ".." in path.parts:
        raise DataError(f"Archive {archive} member {name!r} leaves the target folder ('..'); rejected the archive, nothing was extracted.")


def _local_archive(source: str, work_dir: Path) -> Path:
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        return _download(source, work_dir / (Path(parsed.path).name or "archive"))
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
    elif parsed.scheme == "" or len(parsed.scheme) == 1:
        # A bare path, or a Windows drive letter that urlparse takes for a scheme.
        path = Path(source)
    else:
        raise ConfigError(
            "dataset.source",
            f"scheme {parsed.scheme!r} is not supported; got {source!r}. Use an https:// or file:// URL or a local path.",
        )
    if not path.is_file():
        raise SourceNotFoundError(
            f"dataset.source: archive {path} not found. Download DeFungi (UCI data set 773) "
            "and point dataset.source at the zip file."
        )
    return path


def _download(url: str, destination: Path) -> Path:
    log.info("Downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, next_report = 0, 0.1
            while chunk := response.read(_DOWNLOAD_CHUNK):
                out.write(chunk)
                done += len(chunk)
                if total and done / total >= next_report:
                    log.info("Downloaded %d%% (%.1f of %.1f MB)", 100 * done // total, done / 1e6, total / 1e6)
                    next_report += 0.1
    except OSError as error:
        raise DataError(
            f"Download of {url} failed: {error}. Download the archive by hand and set "
            "dataset.source to its local path."
        ) from error
    return destination


def _check_sha256(archive: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(archive, "rb") as stream:
        while chunk := stream.read(_DOWNLOAD_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise DataError(
            f"Archive {archive} has sha256 {digest.hexdigest()}, but dataset.sha256 expects {expected}. "
            "Download it again, or set dataset.sha256=null to skip the check."
        )
    log.info("Archive %s matches dataset.sha256", archive)

