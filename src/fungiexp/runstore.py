"""Read the runs of a local SQLite MLflow store without importing MLflow.

`fungiexp compare` only reads finished runs' parameters, latest metrics and
tags. Importing MLflow and opening its SQLAlchemy store takes about two
seconds, so for a local ``sqlite:///`` store compare reads the store's tables
directly, read-only. The reader checks the tables and columns it needs first.
If the store cannot be opened or its schema differs, it returns None, and
compare falls back to MLflow's client. A test checks that both give the same
runs.
"""

from __future__ import annotations

import math
import shlex
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

# The tables and columns of MLflow's tracking schema that the reader uses (as in MLflow 3.17).
REQUIRED_COLUMNS = {
    "experiments": {"experiment_id", "name"},
    "runs": {"run_uuid", "experiment_id", "status", "start_time", "lifecycle_stage"},
    "params": {"run_uuid", "key", "value"},
    "tags": {"run_uuid", "key", "value"},
    "latest_metrics": {"run_uuid", "key", "value", "is_nan"},
}


@dataclass
class RunInfo:
    """The part of MLflow's RunInfo that compare reads."""

    run_id: str
    status: str
    start_time: int


@dataclass
class RunData:
    """Parameters, latest metric values and tags of one run."""

    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class StoredRun:
    """A run as compare reads it: ``info`` and ``data``, named as in MLflow's Run."""

    info: RunInfo
    data: RunData


class ExperimentNotFound(LookupError):
    """The store has no experiment of that name; ``names`` lists the experiments it has."""

    def __init__(self, experiment: str, names: list[str]):
        super().__init__(experiment)
        self.names = names


def sqlite_path(uri: str) -> Path | None:
    """Return the database file of a ``sqlite:///`` URI, or None for any other URI."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return Path(uri[len(prefix) :]).expanduser()


def read_runs(uri: str, experiment: str) -> list[StoredRun] | None:
    """Return the active runs of ``experiment``, newest first, or None to use MLflow's client instead.

    Raises:
        ExperimentNotFound: the store has no experiment named ``experiment``.
    """
    path = sqlite_path(uri)
    if path is None or not path.is_file():
        return None
    try:
        connection = _open_read_only(path)
    except sqlite3.Error:
        return None
    try:
        if not _has_expected_schema(connection):
            return None
        return _read(connection, experiment)
    except sqlite3.Error:
        return None
    finally:
        connection.close()


def _open_read_only(path: Path) -> sqlite3.Connection:
    """Open the SQLite database at ``path`` without write access."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def _has_expected_schema(connection: sqlite3.Connection) -> bool:
    for table, columns in REQUIRED_COLUMNS.items():
        found = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
        if not columns <= found:
            return False
    return True


def _read(connection: sqlite3.Connection, experiment: str) -> list[StoredRun]:
    found = connection.execute("SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)).fetchone()
    if found is None:
        names = [name for (name,) in connection.execute("SELECT name FROM experiments WHERE lifecycle_stage = 'active' ORDER BY name")]
        raise ExperimentNotFound(experiment, names)
    selected = "SELECT run_uuid FROM runs WHERE experiment_id = ? AND lifecycle_stage = 'active'"
    runs: dict[str, StoredRun] = {}
    for run_id, status, start_time in connection.execute(
        "SELECT run_uuid, status, start_time FROM runs WHERE experiment_id = ? AND lifecycle_stage = 'active' "
        "ORDER BY start_time DESC, run_uuid",
        found,
    ):
        runs[run_id] = StoredRun(RunInfo(run_id, status, int(start_time or 0)), RunData())
    for run_id, key, value in connection.execute(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({selected})", found):
        runs[run_id].data.params[key] = value
    for run_id, key, value in connection.execute(f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({selected})", found):
        runs[run_id].data.tags[key] = value
    for run_id, key, value, is_nan in connection.execute(
        f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN ({selected})", found
    ):
        runs[run_id].data.metrics[key] = math.nan if is_nan else float(value)
    return list(runs.values())


def resolve_run_id(uri: str, run_id: str) -> str:
    """Return the full id of the run whose id starts with ``run_id`` in a local SQLite store.

    `fungiexp compare` prints the first 8 characters of each id, so the
    commands that take a run id accept such a prefix. A full id, another kind
    of store, or a prefix that matches no run is returned unchanged, and the
    command then reports the run as not found.

    Raises:
        ConfigError: more than one run starts with ``run_id``.
    """
    from fungiexp.errors import ConfigError

    path = sqlite_path(uri)
    if len(run_id) >= 32 or path is None or not path.is_file() or not run_id.isalnum():
        return run_id
    try:
        connection = _open_read_only(path)
        try:
            found = [row[0] for row in connection.execute("SELECT run_uuid FROM runs WHERE run_uuid LIKE ?", (f"{run_id}%",))]
        finally:
            connection.close()
    except sqlite3.Error:
        return run_id
    if len(found) > 1:
        raise ConfigError("run id", f"{run_id!r} is the start of {len(found)} run ids; give more characters.")
    return found[0] if found else run_id


def reject_sweep_parent(run, lacks: str, client) -> None:
    """Raise ConfigError if ``run`` is the parent run of a sweep, which has no ``lacks`` of its own (model, metrics).

    ``client`` (an MlflowClient of the run's store) looks up the name of the
    run's experiment for the compare command in the message.

    Raises:
        ConfigError: ``run`` is a sweep's parent run; the message gives the command that lists its runs.
    """
    from fungiexp.errors import ConfigError

    if run.data.tags.get("fungiexp.sweep.role") == "parent":
        run_id = run.info.run_id
        experiment = shlex.quote(client.get_experiment(run.info.experiment_id).name)
        raise ConfigError(
            "run id",
            f"run {run_id} is the parent run of a sweep and has no {lacks} of its own; pass the id of one of its runs "
            f"(fungiexp compare --experiment {experiment} --sweep {run_id[:8]} lists them).",
        )


def unfinished_run_fix(run) -> str:
    """Return what to do about ``run``, which did not finish: the resume command if it left a checkpoint, else a new run."""
    from fungiexp.tracking import COMMAND_TAG, RESUME_TAG

    # fungiexp train sets RESUME_TAG only on an interrupted run that left a checkpoint.
    resume = run.data.tags.get(RESUME_TAG)
    command = run.data.tags.get(COMMAND_TAG)
    if resume:
        return f"Finish it first with: {resume}"
    if command:
        return f"It left no checkpoint to resume, so train a new run: {command}"
    return "It left no checkpoint to resume, so train a new run."
