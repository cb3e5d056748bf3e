"""The Hydra application behind `fungiexp train`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fungiexp.errors import FungiexpError

log = logging.getLogger(__name__)


def config_dir() -> Path:
    """Return the folder of the primary config.

    ``FUNGIEXP_CONFIG_DIR`` wins; otherwise the ``conf/`` folder of the
    source checkout (the package is installed editable from it).
    """
    override = os.environ.get("FUNGIEXP_CONFIG_DIR")
    if override:
        return Path(override).resolve()
    return Path(__file__).resolve().parents[2] / "conf"


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def train_app(cfg: DictConfig) -> float:
    """Train one run, print its summary and return the validation score that sweepers maximise.

    The score is the best epoch's validation macro-F1, or its accuracy with
    ``trainer.objective=accuracy``.
    """
    from fungiexp.summary import format_summary
    from fungiexp.validate import validate_config

    try:
        # Validate before importing TensorFlow, which alone takes seconds.
        validate_config(cfg)
        from fungiexp.train import train

        result = train(cfg)
    except FungiexpError as error:
        # Config and data errors carry their own fix, so a traceback adds nothing.
        log.error("%s", error)
        if _in_multirun():
            # Hydra records the failed job and runs the others; exiting here would stop the sweep.
            raise
        sys.exit(1)
    except KeyboardInterrupt:
        # Hydra does not end the multirun normally after an interrupt, so close the sweep's parent run here.
        if _in_multirun():
            from hydra.core.hydra_config import HydraConfig

            from fungiexp.sweep import end_parent_run

            end_parent_run(Path(HydraConfig.get().sweep.dir), str(cfg.tracking.uri), "KILLED")
        raise
    print(format_summary(result))
    objective = str(cfg.trainer.objective)
    return result["val_macro_f1"] if objective == "macro_f1" else result["val_accuracy"]


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
