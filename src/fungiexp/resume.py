"""Find the interrupted run that ``trainer.resume`` names, without importing Keras.

`fungiexp train` checks ``trainer.resume`` here before Hydra starts, so a
run that does not exist, already finished or left no checkpoint gives one
error line and no job folder. Training then loads the same run's config and
checkpoint (``train.find_resume_point``).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from fungiexp.errors import ConfigError

# The tag on a training run that names its checkpoint folder.
CHECKPOINT_TAG = "fungiexp.checkpoint_dir"
# The file in a checkpoint folder that records the last completed epoch.
STATE_FILE = "state.json"


def read_state(directory: Path) -> dict | None:
    """Return the checkpoint state in ``directory``, or None if there is none."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def find_resume_run(requested: str, uri: str, experiment: str):
    """Return the run that ``trainer.resume=requested`` names, its checkpoint folder and state.

    ``requested`` is a run id, the first characters of one, or ``last`` (the
    newest interrupted run with a checkpoint in the MLflow experiment named
    ``experiment``).

    Raises:
        ConfigError: If the run does not exist, already finished, or has no checkpoint.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from fungiexp.runstore import resolve_run_id

    client = MlflowClient(tracking_uri=uri)
    if requested == "last":
        found = client.get_experiment_by_name(experiment)
        candidates = [] if found is None else client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=50)
        # A run interrupted before its first epoch ended has the tag but no checkpoint, so it is passed over.
        unfinished = [
            run
            for run in candidates
            if run.info.status in ("KILLED", "FAILED") and CHECKPOINT_TAG in run.data.tags and read_state(Path(run.data.tags[CHECKPOINT_TAG]))
        ]
        if not unfinished:
            raise ConfigError(
                "trainer.resume",
                f"no interrupted run with a checkpoint in experiment {experiment!r}; give a run id or start a new run.",
            )
        run = unfinished[0]
    else:
        # compare prints 8-character ids, which predict, evaluate and reproduce also accept.
        requested = resolve_run_id(uri, requested)
        try:
            run = client.get_run(requested)
        except MlflowException as error:
            raise ConfigError("trainer.resume", f"run {requested!r} not found in {uri}.") from error
    if run.info.status == "FINISHED":
        raise ConfigError("trainer.resume", f"run {run.info.run_id} already finished; nothing to resume.")
    directory = Path(run.data.tags.get(CHECKPOINT_TAG, ""))
    state = read_state(directory) if run.data.tags.get(CHECKPOINT_TAG) else None
    if state is None:
        raise ConfigError(
            "trainer.resume",
            f"run {run.info.run_id} has no checkpoint (it stopped before its first epoch ended, or "
            f"{directory} was removed); start a new run.",
        )
    return run, directory, state


def check_resume(cfg: DictConfig) -> str | None:
    """Return the error that resuming ``trainer.resume`` of ``cfg`` would raise, or None (also when it is not set)."""
    if not cfg.trainer.get("resume"):
        return None
    from fungiexp.tracking import resolve_tracking_uri
    from fungiexp.validate import check_tracking_store

    try:
        uri = resolve_tracking_uri(str(cfg.tracking.uri))
        check_tracking_store(uri)
        find_resume_run(str(cfg.trainer.resume), uri, str(cfg.tracking.experiment))
    except ConfigError as error:
        return str(error)
    return None


def check_resume_overrides(args: list[str]) -> str | None:
    """Compose the config of the command-line ``args`` and return the result of ``check_resume`` on it.

    Flags and ``hydra.`` overrides are left out; a config that cannot be
    composed returns None, so that Hydra reports it.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fungiexp.datacli import compose_config

    items = [arg for arg in args if not arg.startswith("-") and not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        cfg = compose_config(items)
    except (HydraException, OmegaConfBaseException):
        return None
    return check_resume(cfg)
