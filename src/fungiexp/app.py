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
    """Train one run, print its summary and return the validation macro-F1 for sweepers."""
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
        sys.exit(1)
    print(format_summary(result))
    return result["val_macro_f1"]
