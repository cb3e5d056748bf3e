"""Benchmark 7: one VGG16 fine_tune=block5 epoch over the DeFungi training split, fast settings together.

Trains VGG16 with ``fine_tune=block5`` at 224x224 without augmentation,
with the frozen-feature cache and ``trainer.precision=mixed_bfloat16`` (or
the precision given), through ``fungiexp.train.train``. Prints the time to
build the cache (blocks 1 to 4 over the training and validation images,
once), the wall-clock seconds of each epoch once the cache is built, and the
epoch time against the target of three minutes. Weights are random because
ImageNet weights cannot be downloaded everywhere; the arithmetic is the same.
Usage:

    python benchmarks/vgg16_epoch.py [--quick] [--precision float32]
"""

from __future__ import annotations

import argparse
import logging

from common import REAL_ROOT, figure, image_source, machine_line, ratio, run_overrides, scratch_folder, timed

TARGET_SECONDS = 180.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 60 images per class (default: the whole data set)")
    parser.add_argument("--precision", default="mixed_bfloat16", help="trainer.precision (default: mixed_bfloat16)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs (default: 2)")
    options = parser.parse_args()

    from conftest import compose_config
    from mlflow.tracking import MlflowClient

    from fungiexp.train import train

    print(machine_line())
    logging.basicConfig(level=logging.WARNING)
    size = 224
    with scratch_folder() as folder:
        if options.quick or not REAL_ROOT.is_dir():
            source, label = image_source(60, size, folder)
        else:
            source, label = [f"dataset.root={REAL_ROOT}"], "all DeFungi images"
        cfg = compose_config(
            [
                *source,
                *run_overrides(folder, size),
                "model=vgg16",
                "fine_tune=block5",
                "model.weights=null",
                "augmentation=none",
                f"trainer.precision={options.precision}",
                f"trainer.epochs={options.epochs}",
                "trainer.early_stopping.enabled=false",
                "trainer.feature_cache.enabled=true",
                "trainer.feature_cache.persist=false",
            ]
        )
        holder = {}
        total = timed(lambda: holder.update(result=train(cfg)))
        result = holder["result"]
        client = MlflowClient(tracking_uri=result["tracking_uri"])
        run = client.get_run(result["run_id"])
        epochs = [point.value for point in sorted(client.get_metric_history(result["run_id"], "time/epoch_seconds"), key=lambda p: p.step)]
        build = run.data.metrics.get("time/feature_cache_seconds", float("nan"))
        train_images = run.data.params.get("data.train_images", "?")
        cache_tag = run.data.tags.get("fungiexp.feature_cache", "")

    print(f"images: {label}, {train_images} in the training split, {size}x{size}, batch size 32, {options.precision}")
    print(f"feature cache: {cache_tag}")
    print(f"building the feature cache (training and validation splits): {build:.1f} s")
    epoch = figure("seconds per epoch once the cache is built", epochs, "s")
    print(f"whole run, evaluation of the complete model on both splits included: {total:.1f} s")
    ratio(f"target of {TARGET_SECONDS:.0f} s / epoch time", TARGET_SECONDS / epoch)


if __name__ == "__main__":
    main()
