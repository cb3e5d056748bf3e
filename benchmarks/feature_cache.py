"""Benchmark 3: VGG16 without augmentation, with the frozen-feature cache and without.

For each of ``fine_tune=block5`` and ``fine_tune=frozen``, trains the same
run twice through ``fungiexp.train.train``: once with
``trainer.feature_cache.enabled=false`` (every epoch runs all of VGG16 on
every image) and once with the cache (the frozen layers, blocks 1 to 4 or
the whole base, run once per image, before the first epoch). Prints the seconds per epoch of each (wall clock,
validation included), the time to build the cache, and the largest
difference between the two runs' validation metrics, which should be
round-off only. Weights are random (ImageNet weights cannot be downloaded
everywhere); the arithmetic is the same. Usage:

    python benchmarks/feature_cache.py [--quick] [--fine-tune block5]
"""

from __future__ import annotations

import argparse
import logging

from common import figure, image_source, machine_line, ratio, run_overrides, scratch_folder, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64x64 images, about 60 per class, 3 epochs (default: 224x224, 200 per class, 3 epochs)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default: 3)")
    parser.add_argument("--fine-tune", default="block5,frozen", help="comma-separated fine_tune options (default: block5,frozen)")
    options = parser.parse_args()
    size, per_class = (64, 60) if options.quick else (224, 200)

    print(machine_line())
    logging.basicConfig(level=logging.WARNING)
    with scratch_folder() as folder:
        source, label = image_source(per_class, size, folder)
        print(f"images: {label}, {size}x{size}, {options.epochs} epochs, batch size 32")
        ratios = []
        for fine_tune in options.fine_tune.split(","):
            ratios += compare_runs([*source, *run_overrides(folder, size)], fine_tune, options.epochs)
    for name, value in ratios:
        ratio(name, value)


def compare_runs(base: list[str], fine_tune: str, epochs: int) -> list[tuple[str, float]]:
    """Train one setting without and with the cache, print its figures and return its ratios."""
    from conftest import compose_config
    from mlflow.tracking import MlflowClient

    from fungiexp.train import train

    common = [
        *base,
        "model=vgg16",
        f"fine_tune={fine_tune}",
        "model.weights=null",
        "augmentation=none",
        f"trainer.epochs={epochs}",
        "trainer.early_stopping.enabled=false",
        "trainer.deterministic=true",
    ]
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

    epoch_seconds = {name: history(name, "time/epoch_seconds") for name in results}
    difference = max(
        abs(a - b)
        for metric in ("val/loss", "val/accuracy", "val/macro_f1")
        for a, b in zip(history("without cache", metric), history("with cache", metric))
    )
    build = history("with cache", "time/feature_cache_seconds")[0]

    print(f"fine_tune={fine_tune}:")
    without = figure(f"  {fine_tune}: seconds per epoch without the cache", epoch_seconds["without cache"], "s")
    with_cache = figure(f"  {fine_tune}: seconds per epoch with the cache", epoch_seconds["with cache"], "s")
    print(f"  {fine_tune}: building the cache once (training and validation splits): {build:.1f} s")
    print(f"  {fine_tune}: whole run without the cache: {seconds['without cache']:.1f} s, with it: {seconds['with cache']:.1f} s")
    print(f"  {fine_tune}: largest difference of a validation metric (loss, accuracy, macro-F1) between the runs: {difference:.2e}")
    return [
        (f"{fine_tune}: epoch time without / with the cache", without / with_cache),
        (f"{fine_tune}: whole run without / with the cache", seconds["without cache"] / seconds["with cache"]),
    ]


if __name__ == "__main__":
    main()
