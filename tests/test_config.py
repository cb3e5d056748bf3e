"""Config groups compose, and the documented keys exist."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_config

GROUP_OPTIONS = [
    (group, path.stem)
    for group in ("dataset", "augmentation", "model", "optimizer", "fine_tune", "trainer", "tracking")
    for path in sorted((CONF_DIR / group).glob("*.yaml"))
]

PUBLIC_KEYS = [
    "dataset.root",
    "dataset.source",
    "dataset.image_size",
    "model.weights",
    "optimizer.lr",
    "trainer.epochs",
    "trainer.batch_size",
    "trainer.seed",
    "tracking.uri",
    "tracking.experiment",
]


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    assert cfg[group] is not None
    if "name" in cfg[group]:
        assert cfg[group].name == option


def test_groups_have_required_options():
    options = {}
    for group, option in GROUP_OPTIONS:
        options.setdefault(group, set()).add(option)
    assert {"defungi", "defungi_h123"} <= options["dataset"]
    assert {"none", "notebook", "strong"} <= options["augmentation"]
    assert {"vgg16", "small_cnn"} <= options["model"]
    assert {"adam", "sgd"} <= options["optimizer"]
    assert {"frozen", "block5", "block4", "all"} <= options["fine_tune"]


@pytest.mark.parametrize("key", PUBLIC_KEYS)
def test_public_key_exists(key):
    cfg = compose_config(["model=vgg16"])
    parent, _, leaf = key.rpartition(".")
    assert leaf in OmegaConf.select(cfg, parent)


def test_defaults_train_five_classes_small_cnn():
    cfg = compose_config([])
    assert list(cfg.dataset.classes) == ["H1", "H2", "H3", "H5", "H6"]
    assert cfg.model.name == "small_cnn"
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.dataset.split.group_by == "source_image"


def test_defungi_h123_has_three_classes():
    cfg = compose_config(["dataset=defungi_h123"])
    assert list(cfg.dataset.classes) == ["H1", "H2", "H3"]
    assert cfg.dataset.name == "defungi_h123"


def test_notebook_augmentation_matches_notebook():
    aug = compose_config(["augmentation=notebook"]).augmentation
    assert aug.rotation_degrees == 10
    assert aug.width_shift == pytest.approx(0.2)
    assert aug.zoom == pytest.approx(0.3)
    assert aug.horizontal_flip is True
    assert aug.vertical_flip is False


def test_strong_augmentation_uses_label_preserving_turns():
    aug = compose_config(["augmentation=strong"]).augmentation
    assert aug.vertical_flip is True
    assert aug.rot90 is True


def test_misspelt_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="trainer.epoch"):
        compose_config(["trainer.epoch=3"])


def test_every_config_key_has_comment():
    """Check that each key line of the group files carries a trailing comment or inherits one."""
    for path in CONF_DIR.glob("*/*.yaml"):
        base_documented = "defaults:" in path.read_text()
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped or base_documented:
                continue
            if stripped.endswith(":"):
                continue
            assert "#" in line or stripped.startswith(("name:", "H")), f"{path.name}: {line!r} has no comment"
