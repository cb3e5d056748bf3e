"""Group the runs of a Hydra multirun under one MLflow parent run.

Hydra calls ``SweepRunCallback`` in the launching process. It creates the
parent run before the first job and writes its id to a file in the sweep
folder, so that jobs in this process and in launcher subprocesses (joblib,
submitit) find it and tag themselves as its children.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent_run_id"

# Sweep folder and tracking URI of the parent run that this process opened
# and has not ended yet. `fungiexp train` ends it when Hydra stops the
# multirun with an error, because Hydra then skips on_multirun_end.
_open_parent: tuple[Path, str] | None = None


class SweepRunCallback(Callback):
    """Create an MLflow parent run for a multirun and close it when the sweep ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from mlflow.tracking import MlflowClient

        from fungiexp import tracking

        uri, experiment_id = tracking.setup_tracking(config.tracking)
        overrides = list(config.hydra.overrides.task)
        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(
            experiment_id,
            run_name=f"sweep {' '.join(tracking.meaningful_overrides(overrides))}"[:250],
            tags={"fungiexp.sweep.role": "parent", "fungiexp.sweep.overrides": " ".join(overrides)[:5000]},
        )
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PARENT_FILE).write_text(run.info.run_id)
        global _open_parent
        _open_parent = (folder, str(config.tracking.uri))
        log.info("Sweep parent run %s in experiment %r", run.info.run_id, config.tracking.experiment)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        global _open_parent
        end_parent_run(Path(config.hydra.sweep.dir), str(config.tracking.uri), "FINISHED")
        _open_parent = None


def end_open_parent_run(status: str) -> None:
    """Set ``status`` on the parent run that this process opened and has not ended; do nothing if there is none.

    When a job of the sweep fails, Hydra raises its error after the last job
    and skips on_multirun_end, so the parent would stay RUNNING.
    """
    global _open_parent
    if _open_parent is None:
        return
    folder, uri = _open_parent
    _open_parent = None
    end_parent_run(folder, uri, status)
    log.info("Sweep parent run ended as %s", status)


def end_parent_run(sweep_dir: Path, tracking_uri: str, status: str) -> None:
    """Set the status of the parent run of the sweep in ``sweep_dir`` (FINISHED, KILLED or FAILED), if it has one."""
    from mlflow.tracking import MlflowClient

    from fungiexp import tracking

    parent = parent_run_id(Path(sweep_dir))
    if parent:
        MlflowClient(tracking_uri=tracking.resolve_tracking_uri(tracking_uri)).set_terminated(parent, status)


def parent_run_id(sweep_dir: Path) -> str | None:
    """Return the parent run id written for the sweep in ``sweep_dir``, if any."""
    path = Path(sweep_dir) / PARENT_FILE
    return path.read_text().strip() if path.is_file() else None


def sweep_tags() -> dict[str, str]:
    """Return the tags that make the current Hydra job a child of its sweep's parent run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {}
    parent = parent_run_id(Path(hydra_cfg.sweep.dir))
    tags = {"fungiexp.sweep.job": str(hydra_cfg.job.num)}
    if parent:
        tags.update({"mlflow.parentRunId": parent, "fungiexp.sweep.parent": parent})
    return tags
