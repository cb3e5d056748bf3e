"""Benchmark 6: peak resident memory of a training run.

Runs ``fungiexp train`` in a child process and reads its peak resident set
size from the operating system: the default run (small CNN, 128x128) and a
VGG16 run with fine_tune=block5 at batch size 32 (random weights, default
augmentation, so the whole network runs every step). Usage:

    python benchmarks/peak_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from common import image_source, machine_line, run_overrides, scratch_folder

COMMAND = str(Path(sys.executable).with_name("fungiexp"))


def peak_mib(args: list[str], cwd: str) -> tuple[float, float, int]:
    """Run ``fungiexp train ARGS``; return its peak resident memory in MiB, its seconds and exit status."""
    import time

    start = time.perf_counter()
    process = subprocess.Popen([COMMAND, "train", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        print(process.stderr.read()[-2000:])
    # ru_maxrss is in KiB on Linux.
    return usage.ru_maxrss / 1024, time.perf_counter() - start, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 60 images per class, one epoch, VGG16 at 96x96 (default: all images, 2 epochs, 224x224)")
    options = parser.parse_args()

    print(machine_line())
    with scratch_folder() as folder:
        per_class = 60 if options.quick else None
        source, label = image_source(per_class or 100_000, 128, folder)
        if per_class is None:
            source = [item for item in source if not item.startswith("dataset.limit_per_class")]
            label = "all DeFungi images" if "DeFungi" in label else label
        epochs = 1 if options.quick else 2
        vgg_size = 96 if options.quick else 224
        runs = {
            "default run (small_cnn, 128x128, batch 32)": [*source, *run_overrides(folder, 128), f"trainer.epochs={epochs}"],
            f"VGG16 fine_tune=block5, {vgg_size}x{vgg_size}, batch 32": [
                *source,
                *run_overrides(folder, vgg_size),
                "model=vgg16",
                "fine_tune=block5",
                "model.weights=null",
                "trainer.batch_size=32",
                f"trainer.epochs={epochs}" if options.quick else "trainer.epochs=1",
            ],
        }
        print(f"images: {label}")
        peaks = {}
        for name, args in runs.items():
            peak, seconds, status = peak_mib(args, folder)
            peaks[name] = peak
            print(f"peak resident memory, {name}: {peak:.0f} MiB ({seconds:.0f} s, exit status {status})", flush=True)
    first, second = peaks.values()
    print(f"ratio VGG16 block5 / default run peak memory: {second / first:.2f}x")


if __name__ == "__main__":
    main()
