"""Benchmark 4: VGG16 block5 training in mixed_bfloat16 against float32.

Throughput: training steps of VGG16 with blocks 1 to 4 frozen and block 5
and the head trainable, on an in-memory batch, in each Keras precision
policy. Accuracy: the same short training run through ``fungiexp.train.train``
in each policy (random weights, no augmentation, frozen-feature cache on),
and the test macro-F1 of both. bfloat16 pays off on CPUs with AVX512_BF16
or AMX and on recent GPUs; elsewhere it can be slower. Usage:

    python benchmarks/precision.py [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse

import numpy as np

from common import figure, image_source, machine_line, ratio, run_overrides, scratch_folder, timed

POLICIES = ("float32", "mixed_bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="96x96 images and fewer steps (default: 224x224)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per policy (default: 3)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per timed repetition (default: 4 quick, 24 full)")
    parser.add_argument("--throughput-only", action="store_true", help="skip the two short trainings that compare test macro-F1")
    options = parser.parse_args()
    size, steps, per_class, epochs = (96, 4, 60, 3) if options.quick else (224, 24, 200, 5)
    steps = options.steps or steps

    from conftest import compose_config

    import keras

    from fungiexp.models import build_model
    from fungiexp.train import build_loss, build_optimizer, train

    print(machine_line())
    throughput = {}
    for policy in POLICIES:
        cfg = compose_config(["model=vgg16", "fine_tune=block5", "model.weights=null", f"dataset.image_size=[{size},{size}]"])
        keras.mixed_precision.set_global_policy(policy)
        keras.utils.set_random_seed(0)
        model = build_model(cfg.model, cfg.fine_tune, 5, (size, size))
        model.compile(optimizer=build_optimizer(cfg.optimizer), loss=build_loss(0.0))
        batch = 8
        images = np.random.default_rng(0).uniform(0, 255, (batch * steps, size, size, 3)).astype("float32")
        labels = np.random.default_rng(1).integers(0, 5, batch * steps)
        model.fit(images[:batch], labels[:batch], batch_size=batch, epochs=1, verbose=0)
        throughput[policy] = [
            len(images) / timed(lambda: model.fit(images, labels, batch_size=batch, epochs=1, verbose=0)) for _ in range(options.repeats)
        ]
        keras.mixed_precision.set_global_policy("float32")
        del model
        keras.backend.clear_session()

    scores = {}
    with scratch_folder() as folder:
        if options.throughput_only:
            policies = ()
        else:
            policies = POLICIES
        source, label = image_source(per_class, size, folder)
        for policy in policies:
            cfg = compose_config(
                [
                    *source,
                    *run_overrides(folder, size),
                    "model=vgg16",
                    "fine_tune=block5",
                    "model.weights=null",
                    "augmentation=none",
                    f"trainer.epochs={epochs}",
                    "trainer.early_stopping.enabled=false",
                    f"trainer.precision={policy}",
                ]
            )
            scores[policy] = train(cfg)["test"]["macro_f1"]

    medians = {policy: figure(f"VGG16 block5 training throughput, {policy}, batch 8, {size}x{size}", values, "images/s") for policy, values in throughput.items()}
    for policy in scores:
        print(f"test macro-F1 after {epochs} epochs, {policy} ({label}, {size}x{size}): {scores[policy]:.4f}")
    if scores:
        print(f"difference of test macro-F1, mixed_bfloat16 - float32: {scores['mixed_bfloat16'] - scores['float32']:+.4f}")
    ratio("mixed_bfloat16 / float32 throughput", medians["mixed_bfloat16"] / medians["float32"])


if __name__ == "__main__":
    main()
