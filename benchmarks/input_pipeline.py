"""Benchmark 1: the project's input pipeline against a classic ImageDataGenerator pipeline.

Both read the same JPEG files, resize them to the same size and apply the
original notebook's augmentation (rotation up to 10 degrees, width shift 0.2,
zoom 0.3, horizontal flips) to every training image. The project's pipeline
(``fungiexp.pipeline.make_dataset``) decodes each image once and augments
the cached pixels; ``ImageDataGenerator.flow_from_directory`` decodes every
file again in every epoch. Only the pipelines run: no model. Usage:

    python benchmarks/input_pipeline.py [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse

from common import figure, image_source, machine_line, ratio, scratch_folder, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 100 images per class instead of 400")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per pipeline, after one warm-up epoch (default: 3)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (default: 224)")
    options = parser.parse_args()
    per_class = 100 if options.quick else 400
    size = options.image_size

    from conftest import compose_config
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    from fungiexp.data import prepare_data
    from fungiexp.pipeline import build_augmenter, make_dataset

    print(machine_line())
    with scratch_folder() as folder:
        source, label = image_source(per_class, size, folder)
        cfg = compose_config([*source, f"dataset.cache_dir={folder}/cache", f"dataset.image_size=[{size},{size}]", "augmentation=notebook"])
        data = prepare_data(cfg.dataset)
        records = data.splits["train"]
        print(f"images: {len(records)} training images at {size}x{size}, {label}")

        augmenter = build_augmenter(cfg.augmentation, (size, size), seed=0)
        dataset = make_dataset(records, data.report.class_root, (size, size), 32, training=True, augmenter=augmenter, seed=0)

        def project_epoch():
            for _ in dataset:
                pass

        first = timed(project_epoch)
        project = [len(records) / timed(project_epoch) for _ in range(options.repeats)]

        # The same files through the classic API, as the original notebook read them.
        import pandas as pd

        frame = pd.DataFrame(
            {
                "filename": [str(data.report.class_root / record.path) for record in records],
                "class": [data.codes[record.label] for record in records],
            }
        )
        generator = ImageDataGenerator(rotation_range=10, width_shift_range=0.2, zoom_range=0.3, horizontal_flip=True)
        flow = generator.flow_from_dataframe(frame, x_col="filename", y_col="class", target_size=(size, size), batch_size=32, seed=0)

        def classic_epoch():
            for index in range(len(flow)):
                flow[index]

        classic_epoch()
        classic = [len(records) / timed(classic_epoch) for _ in range(options.repeats)]

    print(f"project pipeline, first epoch (decodes and caches): {len(records) / first:.2f} images/s")
    project_median = figure("project pipeline (tf.data, decode once, augment cached pixels)", project, "images/s")
    classic_median = figure("ImageDataGenerator (decodes every epoch)", classic, "images/s")
    ratio("project pipeline / ImageDataGenerator", project_median / classic_median)


if __name__ == "__main__":
    main()
