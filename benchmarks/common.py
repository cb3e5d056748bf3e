"""Helpers shared by the benchmark scripts: timing statistics, output lines and test images.

Every script prints one line per figure as ``name: median unit (min to max,
N repetitions)`` and its ratios last, so runs can be compared line by line.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REAL_ROOT = REPO_ROOT / "data" / "defungi"


def figure(name: str, values: list[float], unit: str) -> float:
    """Print one figure as its median with the spread, and return the median."""
    median = statistics.median(values)
    if len(values) > 1:
        print(f"{name}: {median:.2f} {unit} ({min(values):.2f} to {max(values):.2f}, {len(values)} repetitions)", flush=True)
    else:
        print(f"{name}: {median:.2f} {unit} (1 repetition)", flush=True)
    return median


def ratio(name: str, value: float) -> None:
    """Print one ratio line."""
    print(f"ratio {name}: {value:.2f}x", flush=True)


def timed(call) -> float:
    """Return the wall-clock seconds that ``call()`` takes."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def image_source(per_class: int, size: int, folder: str) -> tuple[list[str], str]:
    """Return overrides that select about ``per_class`` images per class, and a label saying which.

    The DeFungi images of ``data/defungi`` when they are there
    (``dataset.limit_per_class`` keeps whole source images), otherwise
    synthetic images written into ``folder``.
    """
    if REAL_ROOT.is_dir():
        return [f"dataset.root={REAL_ROOT}", f"dataset.limit_per_class={per_class}"], f"DeFungi images, about {per_class} per class"
    from conftest import write_synthetic_dataset

    root = write_synthetic_dataset(Path(folder) / "defungi", source_images=max(2, per_class // 4), patches=4, size=size)
    overrides = [f"dataset.root={root}", "dataset.expected_images=null"]
    overrides += [f"dataset.class_info.{code}.expected_images=null" for code in ("H1", "H2", "H3", "H5", "H6")]
    return overrides, f"synthetic images ({REAL_ROOT} not found), about {per_class} per class"


def run_overrides(folder: str, size: int) -> list[str]:
    """Overrides that keep everything a run writes in ``folder`` and skip its figures and model."""
    return [
        f"dataset.cache_dir={folder}/cache",
        f"dataset.image_size=[{size},{size}]",
        "trainer.verbose=0",
        f"trainer.checkpoint_dir={folder}/checkpoints",
        f"trainer.feature_cache.dir={folder}/features",
        f"trainer.image_cache.dir={folder}/images_cache",
        f"tracking.uri=sqlite:///{folder}/mlflow.db",
        f"tracking.artifact_root={folder}/artifacts",
        "tracking.experiment=benchmark",
        "tracking.log_model=false",
        "tracking.figures.gradcam=false",
        "tracking.figures.augmentation_preview=false",
        "tracking.figures.error_gallery=false",
        "evaluation.bootstrap.resamples=0",
    ]


def scratch_folder() -> tempfile.TemporaryDirectory:
    """Return a temporary folder for one benchmark's files."""
    return tempfile.TemporaryDirectory(prefix="fungiexp-benchmark-")


def machine_line() -> str:
    """Describe the machine and versions in one line."""
    import platform

    import tensorflow as tf

    import keras

    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, TensorFlow {tf.__version__}, Keras {keras.__version__}"
