"""MLflow helpers: store set-up, parameter flattening and provenance tags."""

from __future__ import annotations

import json
import re
import logging
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from omegaconf import DictConfig, OmegaConf

from fungiexp.validate import check_tracking_store

log = logging.getLogger(__name__)

TRUNCATION_MARKER = "...[truncated]"
MAX_NAME_LENGTH = 250
# MLflow accepts letters, digits, underscores, dashes, periods, spaces, colons and slashes in names.
_INVALID_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_\-. :/]")
VERSIONED_PACKAGES = ("tensorflow", "keras", "mlflow", "hydra-core", "omegaconf", "numpy", "scikit-learn", "fungiexp")


def resolve_tracking_uri(uri: str) -> str:
    """Return ``uri`` with a relative sqlite path made absolute, creating its folder."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    if uri.startswith(prefix):
        Path(uri[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def setup_tracking(tracking_cfg: DictConfig) -> tuple[str, str]:
    """Point MLflow at the configured store and experiment, creating both if needed.

    Returns:
        The resolved tracking URI and the experiment id.
    """
    uri = resolve_tracking_uri(str(tracking_cfg.uri))
    check_tracking_store(uri)
    mlflow.set_tracking_uri(uri)
    name = str(tracking_cfg.experiment)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if tracking_cfg.get("artifact_root"):
            artifact_root = Path(str(tracking_cfg.artifact_root)).resolve()
            artifact_root.mkdir(parents=True, exist_ok=True)
            location = artifact_root.as_uri()
        experiment_id = mlflow.create_experiment(name, artifact_location=location)
        log.info("Created MLflow experiment %r in %s", name, uri)
    else:
        experiment_id = experiment.experiment_id
    return uri, experiment_id


def metric_name(name: str) -> str:
    """Return ``name`` with characters MLflow rejects replaced by ``_``, cut to its length limit."""
    return _INVALID_NAME_CHARACTERS.sub("_", name)[:MAX_NAME_LENGTH]


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """Flatten a resolved config into dotted keys with string values.

    Lists are written as JSON. Values longer than MLflow's limit are cut and
    end with a marker; the full config is logged as a file beside them.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, str] = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), child)
            return
        text = json.dumps(value) if isinstance(value, list) else str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER
        flat[metric_name(prefix)] = text

    visit("", container)
    return flat


def log_params(params: dict[str, str]) -> None:
    """Log parameters in batches of the size MLflow accepts."""
    items = list(params.items())
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(items[start : start + MAX_PARAMS_TAGS_PER_BATCH]))


# The command line that started a run.
COMMAND_TAG = "fungiexp.command"
# Set on a run that was interrupted after a checkpoint: the command that continues it.
RESUME_TAG = "fungiexp.resume_command"


def provenance_tags() -> dict[str, str]:
    """Return tags that tell how to reproduce a run: git state, versions, machine."""
    tags = {
        "fungiexp.python": platform.python_version(),
        "fungiexp.platform": platform.platform(),
        "fungiexp.machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        COMMAND_TAG: command_line(),
    }
    for package in VERSIONED_PACKAGES:
        try:
            tags[f"fungiexp.version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"fungiexp.version.{package}"] = "not installed"
    commit, dirty = git_state()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["fungiexp.git.commit"] = commit
        tags["fungiexp.git.dirty"] = str(dirty).lower()
    else:
        tags["fungiexp.git.commit"] = "unknown (not a git checkout)"
    return tags


# Override prefixes that describe where a run went or how it logs, not what it tried.
_BOOKKEEPING_OVERRIDES = (
    "tracking.",
    "hydra.",
    "dataset.root=",
    "dataset.source=",
    "dataset.cache_dir=",
    "dataset.split.manifest=",
    "trainer.checkpoint_dir=",
    "trainer.resume=",
    "trainer.verbose=",
)


def meaningful_overrides(overrides: list[str]) -> list[str]:
    """Return the overrides that change what a run tries, for naming runs."""
    return [item for item in overrides if not item.lstrip("+~").startswith(_BOOKKEEPING_OVERRIDES)]


def command_line() -> str:
    """Return the command that started this process, as a user would type it."""
    if not sys.argv:
        return ""
    # `fungiexp train` hands Hydra an argv whose first item is "fungiexp train".
    program = sys.argv[0] if sys.argv[0].startswith("fungiexp") else "fungiexp"
    return " ".join([program, *sys.argv[1:]])


def git_state() -> tuple[str | None, bool]:
    """Return the HEAD commit of the source checkout and whether it has uncommitted changes.

    Changes count in tracked files anywhere and in untracked files under
    ``src/`` (new code a run may import). Other untracked files, such as
    images copied into the project for predict, do not change a run.
    """
    source_dir = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=source_dir,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit, has_changes(status)


def has_changes(porcelain: str) -> bool:
    """Return whether ``git status --porcelain`` output lists a change that can alter a run (see ``git_state``)."""
    for line in porcelain.splitlines():
        if not line.strip():
            continue
        # Untracked entries read "?? PATH", with PATH relative to the repository root and quoted when unusual.
        if not line.startswith("?? ") or line[3:].lstrip('"').startswith("src/"):
            return True
    return False


def ui_command(uri: str) -> str:
    """Return the shell command that opens the MLflow UI on ``uri``, bound to 127.0.0.1.

    The command names the ``mlflow`` program of this Python environment, so it
    works without activating a virtual environment.
    """
    program = Path(sys.executable).parent / "mlflow"
    executable = str(program) if program.is_file() else "mlflow"
    return f"{executable} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
