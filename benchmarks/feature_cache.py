"""Benchmark 3: VGG16 with fine_tune=block5 and no augmentation, with the frozen-feature cache and without.

Trains the same run twice through ``fungiexp.train.train``: once with
``trainer.feature_cache.enabled=false`` (every epoch runs all of VGG16 on
every image) and once with the cache (blocks 1 to 4 run once per image,
before the first epoch). Prints the seconds per epoch of each (wall clock,
validation included), the time to build the cache, and the largest
difference between the two runs' validation metrics, which should be
round-off only. Weights are random (ImageNet weights cannot be downloaded
everywhere); the arithmetic is the same. Usage:

    python benchmarks/feature_cache.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import re

from common import figure, image_source, machine_line, ratio, run_overrides, scratch_folder, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64x64 images, about 60 per class, 3 epochs (default: 224x224, 200 per class, 3 epochs)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default: 3)")
    options = parser.parse_args()
    size, per_class = (64, 60) if options.quick else (224, 200)

    from conftest import compose_config
    from mlflow.tracking import MlflowClient

    from fungiexp.train import train

    print(machine_line())
    logging.basicConfig(level=logging.WARNING)
    with scratch_folder() as folder:
        source, label = image_source(per_class, size, folder)
        common = [
            *source,
            *run_overrides(folder, size),
            "model=vgg16",
            "fine_tune=block5",
            "model.weights=null",
            "augmentation=none",
            f"trainer.epochs={options.epochs}",
            "trainer.early_stopping.enabled=false",
            "trainer.deterministic=true",
        ]
        print(f"images: {label}, {size}x{size}, {options.epochs} epochs, batch size 32")
        results = {}
        seconds = {}
        for name, setting in (("without cache", "false"), ("with cache", "true")):
            cfg = compose_config([*common, f"trainer.feature_cache.enabled={setting}"])
            holder = {}
            seconds[name] = timed(lambda: holder.update(result=train(cfg)))
            results[name] = holder["result"]

        client = MlflowClient(tracking_uri=results["with cache"]["tracking_uri"])

        def history(name, metric):
            return [point.value for point in sorted(client.get_metric_history(results[name]["run_id"], metric), key=lambda p: p.step)]

        epochs = {name: history(name, "time/epoch_seconds") for name in results}
        difference = max(
            abs(a - b)
            for metric in ("val/loss", "val/accuracy", "val/macro_f1")
            for a, b in zip(history("without cache", metric), history("with cache", metric))
        )
        build = seconds["with cache"] - sum(epochs["with cache"])

    without = figure("seconds per epoch without the cache", epochs["without cache"], "s")
    with_cache = figure("seconds per epoch with the cache", epochs["with cache"], "s")
    print(f"whole run without the cache: {seconds['without cache']:.1f} s")
    print(f"whole run with the cache: {seconds['with cache']:.1f} s (building the cache and evaluating: about {build:.1f} s)")
    print(f"largest difference of a validation metric (loss, accuracy, macro-F1) between the runs: {difference:.2e}")
    ratio("epoch time without / with the cache", without / with_cache)
    ratio("whole run without / with the cache", seconds["without cache"] / seconds["with cache"])


if __name__ == "__main__":
    main()
