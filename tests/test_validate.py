"""Config validation rejects bad settings before any data is read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_config
from fungiexp.errors import ConfigError
from fungiexp.validate import validate_config

INVALID = [
    (["+trainer.epoch=3"], r"trainer.epoch: unknown key. Did you mean trainer.epochs\?"),
    (["trainer.epochs=abc"], r"trainer.epochs: invalid value 'abc'.*could not be converted to Integer"),
    (["dataset.image_size=128"], r"dataset.image_size: invalid value 128: expected a list, for example \[128, 128\]\.$"),
    (["evaluation.tta_views=[flips]"], r"evaluation.tta_views: invalid value \['flips'\]: expected one of flips, dihedral, not a list\.$"),
    (["model.name=[vgg16]"], r"model.name: invalid value \['vgg16'\]: expected one of vgg16, small_cnn, small_cnn_bn, not a list\.$"),
    (["trainer.epochs=[3]"], r"trainer.epochs: invalid value \[3\]: expected one value, an integer, not a list\.$"),
    (["dataset.image_size=[32,abc]"], r"dataset.image_size\[1\]: invalid value 'abc': expected an integer \("),
    (["trainer.epochs=0"], r"trainer.epochs: must be a positive integer; got 0"),
    (["trainer.batch_size=-8"], r"trainer.batch_size: must be a positive integer; got -8"),
    (["optimizer.lr=0"], r"optimizer.lr: must be positive; got 0\b"),
    (["optimizer.name=rmsprop"], r"optimizer.name: must be one of adam, adamw, sgd; got 'rmsprop'"),
    (["dataset.split.val_fraction=0.6", "dataset.split.test_fraction=0.4"], r"val_fraction \+ test_fraction must be below 1"),
    (["dataset.classes=[H1,H9]"], r"dataset.classes: \['H9'\] not in dataset.class_info; valid codes are"),
    (["model=vgg16", "model.weights=null", "dataset.image_size=[16,16]"], r"model=vgg16 needs at least 32x32 pixels; got \[16, 16\]"),
    (["model=vgg16", "model.weights=null", "fine_tune.trainable_from=block6_conv1"], r"valid first layers are block1_conv1, block2_conv1"),
    (["model=small_cnn", "fine_tune=block5"], r"fine_tune=block5 does not apply to model=small_cnn"),
    (["model=vgg16", "model.weights=/nowhere/vgg16.h5"], r"model.weights: weights file /nowhere/vgg16.h5 not found"),
    (["optimizer=adamw", "optimizer.weight_decay=null"], r"optimizer.weight_decay: optimizer=adamw needs a weight decay, for example 0.01"),
    (["trainer.precision=fp8"], r"trainer.precision: must be one of float32, mixed_bfloat16, mixed_float16; got 'fp8'"),
    (["trainer.label_smoothing=1.5"], r"trainer.label_smoothing: must be at least 0 and below 1"),
    (["optimizer.schedule=step"], r"optimizer.schedule: must be one of constant, cosine; got 'step'"),
    (["model=small_cnn_bn", "model.stem_stride=3"], r"model.stem_stride: must be 1 or 2; got 3"),
    (["evaluation.bootstrap.confidence=95"], r"evaluation.bootstrap.confidence: must be between 0 and 1"),
    (["evaluation.class_offsets.max_abs=0"], r"evaluation.class_offsets.max_abs: must be positive"),
    (["evaluation.class_offsets.steps=1"], r"evaluation.class_offsets: steps must be 2 or more"),
    (["trainer.feature_cache.dtype=int8"], r"trainer.feature_cache.dtype: must be one of float32, float16; got 'int8'"),
    (["evaluation.tta=maybe"], r"evaluation.tta: invalid value 'maybe': expected true or false"),
    (["evaluation.tta=no"], r"evaluation.tta: invalid value 'no': expected true or false\.$"),
    (["trainer.deterministic=2"], r"trainer.deterministic: invalid value 2: expected true or false\.$"),
    (["evaluation.tta_views=rotations"], r"evaluation.tta_views: must be one of flips, dihedral; got 'rotations'"),
    (
        ["dataset.image_size=[128,96]", "augmentation.rot90=false", "evaluation.tta=true", "evaluation.tta_views=dihedral"],
        r"evaluation.tta_views: dihedral rotates images by 90 degrees and needs square ones",
    ),
    (["trainer.batch_size=abc"], r"trainer.batch_size: invalid value 'abc': expected an integer"),
    (["trainer.monitor=test_loss"], r"trainer.monitor: must be one of val_loss, val_accuracy, val_macro_f1; got 'test_loss'"),
    (["dataset.split.group_by=patient"], r"dataset.split.group_by: must be one of source_image, sample, none"),
    (["augmentation.fill_mode=mirror"], r"augmentation.fill_mode: must be one of reflect, wrap, nearest, constant"),
    (["dataset.image_size=[128,96]"], r"augmentation.rot90: needs square images"),
    (["dataset.split.folds=5", "dataset.split.fold=7"], r"dataset.split.fold: must be in 0..4 for 5 folds; got 7"),
    (["dataset.on_bad_image=ignore"], r"dataset.on_bad_image: must be one of error, skip; got 'ignore'"),
]


@pytest.mark.parametrize(("overrides", "message"), INVALID, ids=[" ".join(case[0]) for case in INVALID])
def test_invalid_config_raises(synthetic_root, overrides, message):
    cfg = compose_config([f"dataset.root={synthetic_root}", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_missing_class_folder_raises(synthetic_root, tmp_path):
    root = tmp_path / "data"
    (root / "TSH").mkdir(parents=True)
    (root / "BASH").mkdir()
    cfg = compose_config([f"dataset.root={root}", "dataset=defungi_h123"])
    with pytest.raises(ConfigError, match=r"dataset.classes: classes \['H3'\] have no folder in .*; classes present are \['H1', 'H2'\]"):
        validate_config(cfg)


def test_missing_root_without_source_raises(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.root: folder .*absent does not exist and dataset.source is not set"):
        validate_config(compose_config([f"dataset.root={tmp_path / 'absent'}"]))


def test_unreachable_tracking_server_raises(synthetic_root):
    from fungiexp.validate import check_tracking_store

    # Port 9 (discard) on the loopback interface has no MLflow server.
    with pytest.raises(ConfigError, match=r"tracking.uri: MLflow tracking server http://127.0.0.1:9 is not reachable"):
        check_tracking_store("http://127.0.0.1:9")


@pytest.mark.parametrize("option", ["defungi", "defungi_h123"])
def test_shipped_configs_are_valid(synthetic_root, option):
    for model in (["model=small_cnn"], ["model=vgg16", "fine_tune=block5"], ["model=vgg16", "fine_tune=frozen"]):
        validate_config(compose_config([f"dataset={option}", f"dataset.root={synthetic_root}", *model]))


def test_cli_rejects_config_before_importing_tensorflow(synthetic_root, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "fungiexp", "train", f"dataset.root={synthetic_root}", "optimizer.lr=-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 1
    output = completed.stdout + completed.stderr
    assert "optimizer.lr: must be positive; got -1" in output
    assert "Traceback" not in output
    assert "oneDNN" not in output


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("trainer.epoch", "trainer.epoch: unknown key. Did you mean trainer.epochs?"),
        ("dataset.split.seeds", "dataset.split.seeds: unknown key. Did you mean dataset.split.seed?"),
        ("trainer.early_stoping.patience", "trainer.early_stoping: unknown key. Did you mean trainer.early_stopping?"),
        ("dataset.class_info.H1.expected_image", "dataset.class_info.H1.expected_image: unknown key. Did you mean dataset.class_info.H1.expected_images?"),
        ("trainer.epochs", None),
        ("dataset.class_info.H1.expected_images", None),
        ("tracking.figures.gradcam", None),
    ],
)
def test_override_keys_are_checked_against_the_schema(key, message):
    from fungiexp.validate import unknown_override_key

    assert unknown_override_key(key) == message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("modle=vgg16", "modle: unknown key. Did you mean model?"),
        ("experiment=notebook_small_cnn", "experiment: this config group is not in the defaults list, so add it with a plus: +experiment=notebook_small_cnn"),
        ("model=vgg16", None),
        ("hydra/launcher=joblib", None),
        ("+experiment=notebook_small_cnn", None),
        ("+trainer.ema_decy=0.9", "trainer.ema_decy: unknown key. Did you mean trainer.ema_decay?"),
        ("++trainer.ema=0.9", None),
        ("+dataset.split.manifest=split.csv", None),
        ("model=small_cn", "model=small_cn: no such option (conf/model/small_cn.yaml does not exist). Did you mean small_cnn? Options: small_cnn, small_cnn_bn, vgg16."),
        ("model=vgg16,small_cn", "model=small_cn: no such option (conf/model/small_cn.yaml does not exist). Did you mean small_cnn? Options: small_cnn, small_cnn_bn, vgg16."),
        ("model=vgg16,small_cnn", None),
        ("model=choice(vgg16,small_cnn)", None),
        ("+experiment=notebook_smal_cnn", "experiment=notebook_smal_cnn: no such option (conf/experiment/notebook_smal_cnn.yaml does not exist). Did you mean notebook_small_cnn? Options: defungi5_scratch_reference, defungi5_small_cnn_quick, defungi5_small_cnn_reference, defungi5_vgg16_corrected, notebook_small_cnn, notebook_vgg16_block5."),
        ("augmentation=xyz", "augmentation=xyz: no such option (conf/augmentation/xyz.yaml does not exist). Options: microscopy, none, notebook, strong."),
    ],
)
def test_group_names_are_checked(override, message, monkeypatch):
    from fungiexp.validate import check_overrides

    # Paths in the messages are relative to the working directory.
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert check_overrides([override]) == message


def run_fungiexp(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fungiexp", *args], capture_output=True, text=True, check=False, cwd=cwd)


def test_cli_names_a_misspelt_override_key():
    completed = run_fungiexp("train", "trainer.epoch=3")
    assert completed.returncode == 1
    assert "trainer.epoch: unknown key. Did you mean trainer.epochs?" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_reproduce_names_a_misspelt_override_key():
    completed = run_fungiexp("reproduce", "experiments/defungi5_small_cnn_quick.yaml", "trainer.epoch=1")
    assert completed.returncode == 1
    assert "fungiexp reproduce: error: trainer.epoch: unknown key. Did you mean trainer.epochs?" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_merged_overrides_keep_yes_as_text():
    from fungiexp.validate import merge_overrides

    cfg = compose_config([])
    merged = merge_overrides(cfg, ["evaluation.tta=yes", "+evaluation.bootstrap.seed=3", "dataset.image_size=[48,48]"])
    assert merged.evaluation.tta == "yes"
    assert merged.evaluation.bootstrap.seed == 3
    assert list(merged.dataset.image_size) == [48, 48]
    assert cfg.evaluation.tta is False
    with pytest.raises(ConfigError, match="expected true or false"):
        validate_config(merged)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("evaluation.tta=true,false", "not a sweep or a deletion"),
        ("~evaluation.tta", "not a sweep or a deletion"),
        ("evaluation.tta_views=[flips", "cannot read this override"),
    ],
)
def test_merged_overrides_reject_sweeps(override, message):
    from fungiexp.validate import merge_overrides

    with pytest.raises(ConfigError, match=message):
        merge_overrides(compose_config([]), [override])


def test_evaluate_checks_values_before_loading_the_run(tmp_path):
    # The run id does not exist: the value error must come first, before the store and TensorFlow are touched.
    completed = run_fungiexp("evaluate", "nosuchrun", "evaluation.tta=yes", "--tracking-uri", f"sqlite:///{tmp_path}/none.db", cwd=tmp_path)
    assert completed.returncode == 1
    assert "fungiexp evaluate: error: evaluation.tta: invalid value 'yes': expected true or false." in completed.stderr
    assert "cuInit" not in completed.stderr
