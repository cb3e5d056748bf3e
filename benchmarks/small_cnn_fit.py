"""Benchmark 2: small_cnn at 128x128, end-to-end ``fit`` against compute-only steps.

End to end: ``model.fit`` on the project's training dataset (decoded images
cached, the default ``strong`` augmentation applied on the fly), as a run
trains, and the same without augmentation. Compute only: ``model.fit`` on
the same number of images held as one in-memory tensor. The ratio without
augmentation shows whether the pipeline makes the model wait (1.0: never).
The ratio with augmentation shows how much of the two cores the
augmentation's own arithmetic takes.
Each epoch is timed by the wall clock, so a stall at an epoch's end counts. Usage:

    python benchmarks/small_cnn_fit.py [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse

import numpy as np

from common import figure, image_source, machine_line, ratio, scratch_folder, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 100 images per class instead of 600")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per setting, after one warm-up epoch (default: 3)")
    options = parser.parse_args()
    per_class = 100 if options.quick else 600
    size = 128

    from conftest import compose_config

    import keras

    from fungiexp.data import prepare_data
    from fungiexp.models import build_model
    from fungiexp.pipeline import build_augmenter, make_dataset
    from fungiexp.train import build_loss, build_optimizer

    print(machine_line())
    with scratch_folder() as folder:
        source, label = image_source(per_class, size, folder)
        cfg = compose_config([*source, f"dataset.cache_dir={folder}/cache", f"dataset.image_size=[{size},{size}]"])
        data = prepare_data(cfg.dataset)
        records = data.splits["train"]
        print(f"images: {len(records)} training images at {size}x{size}, {label}; augmentation={cfg.augmentation.name}")

        def fresh_model():
            keras.utils.set_random_seed(0)
            model = build_model(cfg.model, cfg.fine_tune, len(data.codes), (size, size))
            model.compile(optimizer=build_optimizer(cfg.optimizer), loss=build_loss(0.0), metrics=["accuracy"])
            return model

        augmenter = build_augmenter(cfg.augmentation, (size, size), seed=0)
        dataset = make_dataset(records, data.report.class_root, (size, size), 32, training=True, augmenter=augmenter, seed=0)
        model = fresh_model()
        model.fit(dataset, epochs=1, verbose=0, shuffle=False)
        end_to_end = [len(records) / timed(lambda: model.fit(dataset, epochs=1, verbose=0, shuffle=False)) for _ in range(options.repeats)]

        plain = make_dataset(records, data.report.class_root, (size, size), 32, training=True, seed=0)
        model = fresh_model()
        model.fit(plain, epochs=1, verbose=0, shuffle=False)
        no_augmentation = [len(records) / timed(lambda: model.fit(plain, epochs=1, verbose=0, shuffle=False)) for _ in range(options.repeats)]

        rng = np.random.default_rng(0)
        images = rng.uniform(0, 255, (len(records), size, size, 3)).astype("float32")
        labels = rng.integers(0, len(data.codes), len(records))
        model = fresh_model()
        model.fit(images, labels, batch_size=32, epochs=1, verbose=0)
        compute = [
            len(records) / timed(lambda: model.fit(images, labels, batch_size=32, epochs=1, verbose=0)) for _ in range(options.repeats)
        ]

    end_median = figure("end-to-end fit (project pipeline, strong augmentation)", end_to_end, "images/s")
    plain_median = figure("end-to-end fit (project pipeline, no augmentation)", no_augmentation, "images/s")
    compute_median = figure("compute-only fit (in-memory tensor, no augmentation)", compute, "images/s")
    ratio("end-to-end / compute-only", end_median / compute_median)
    ratio("end-to-end without augmentation / compute-only (1.0: the pipeline never makes the model wait)", plain_median / compute_median)


if __name__ == "__main__":
    main()
