"""Measure memory across the jobs of a sequential sweep in one process.

Runs ``--jobs`` small training runs one after another through
``fungiexp.train.train`` (as Hydra's basic launcher does) on synthetic
images, prints the resident memory after each job, and last the growth from
the second job to the last as a ratio. Usage:

    python benchmarks/sweep_memory.py [--jobs 10] [--image-size 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def resident_mib() -> float:
    """Return this process's resident set size in MiB (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10, help="jobs in the sweep (default: 10)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    options = parser.parse_args()

    from conftest import compose_config, write_synthetic_dataset
    from fungiexp.train import train

    with tempfile.TemporaryDirectory() as folder:
        root = write_synthetic_dataset(Path(folder) / "data", source_images=10, patches=4, size=options.image_size)
        readings = []
        for job in range(1, options.jobs + 1):
            cfg = compose_config(
                [
                    f"dataset.root={root}",
                    "dataset.expected_images=null",
                    f"dataset.image_size=[{options.image_size},{options.image_size}]",
                    "trainer.epochs=2",
                    "trainer.verbose=0",
                    f"trainer.seed={job}",
                    f"trainer.checkpoint_dir={folder}/checkpoints",
                    f"tracking.uri=sqlite:///{folder}/mlflow.db",
                    f"tracking.artifact_root={folder}/artifacts",
                    "tracking.experiment=memory",
                ]
            )
            train(cfg)
            readings.append(resident_mib())
            print(f"job {job:2d}: resident memory {readings[-1]:8.1f} MiB", flush=True)
    growth = readings[-1] / readings[1] - 1.0
    print(f"growth from job 2 to job {options.jobs}: {growth * 100:+.1f}% ({readings[1]:.1f} -> {readings[-1]:.1f} MiB)")


if __name__ == "__main__":
    main()
