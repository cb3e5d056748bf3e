"""Shared fixtures: a synthetic DeFungi-like image folder and quick configs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
# CI and developers keep the DeFungi archive beside the checkout; the
# environment variable points elsewhere.
DEFUNGI_ZIP = Path(os.environ.get("FUNGIEXP_DEFUNGI_ZIP", REPO_ROOT.parent / "shared" / "data" / "defungi.zip"))

FOLDERS = {"H1": "TSH", "H2": "BASH", "H3": "GMA", "H5": "SHC", "H6": "BBH"}
# A distinct mean colour per class makes the synthetic images learnable in one epoch.
CLASS_COLOURS = {
    "H1": (200, 60, 60),
    "H2": (60, 200, 60),
    "H3": (60, 60, 200),
    "H5": (200, 200, 60),
    "H6": (60, 200, 200),
}


def write_synthetic_dataset(root: Path, source_images: int = 6, patches: int = 3, size: int = 40, seed: int = 0) -> Path:
    """Write JPEG patches named like DeFungi's (``H1_3a_2.jpg``) under ``root/<FOLDER>/``.

    Each class gets ``source_images`` source images (two per sample: ``3a``
    and ``3b``) with ``patches`` patches each.
    """
    rng = np.random.default_rng(seed)
    for code, folder in FOLDERS.items():
        class_dir = root / folder
        class_dir.mkdir(parents=True, exist_ok=True)
        colour = np.array(CLASS_COLOURS[code], dtype=float)
        for index in range(source_images):
            source = f"{code}_{index // 2 + 1}{'ab'[index % 2]}"
            for patch in range(1, patches + 1):
                noise = rng.normal(0, 25, size=(size, size, 3))
                pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(class_dir / f"{source}_{patch}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A read-only synthetic data set shared by all tests: 5 classes x 6 source images x 3 patches."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "defungi")


def compose_config(overrides: list[str]):
    """Compose the project's config with Hydra's compose API.

    The data check's cache and the feature cache's files are off unless an
    override sets ``dataset.cache_dir`` or ``trainer.feature_cache.persist``,
    so that tests never write into the working directory.
    """
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=["dataset.cache_dir=null", "trainer.feature_cache.persist=false", *overrides])


@pytest.fixture
def quick_overrides(synthetic_root, tmp_path) -> list[str]:
    """Overrides for a run of seconds: tiny images, one epoch, a store in tmp_path."""
    return [
        f"dataset.root={synthetic_root}",
        "dataset.expected_images=null",
        f"dataset.cache_dir={tmp_path}/cache",
        "dataset.image_size=[32,32]",
        "trainer.epochs=1",
        "trainer.batch_size=8",
        "trainer.verbose=0",
        f"trainer.checkpoint_dir={tmp_path}/checkpoints",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        f"tracking.artifact_root={tmp_path}/mlruns/artifacts",
        "tracking.experiment=test",
    ]


@pytest.fixture
def make_config(quick_overrides):
    """Return a function that composes the quick config plus extra overrides."""

    def make(*extra: str):
        return compose_config([*quick_overrides, *extra])

    return make
