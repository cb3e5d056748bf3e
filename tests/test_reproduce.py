"""Deterministic runs and `fungiexp reproduce`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import CONF_DIR, DEFUNGI_ZIP, compose_config
from fungiexp.reproduce import changed_by_overrides, compare_metrics, format_table, reproduce_main
from fungiexp.train import train

pytestmark = pytest.mark.slow

EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))


def losses(result):
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    return [point.value for point in client.get_metric_history(result["run_id"], "train/loss")]


def test_deterministic_runs_are_identical(make_config):
    first = train(make_config("trainer.deterministic=true", "trainer.epochs=2", "augmentation=strong"))
    second = train(make_config("trainer.deterministic=true", "trainer.epochs=2", "augmentation=strong"))
    other_seed = train(make_config("trainer.deterministic=true", "trainer.epochs=2", "augmentation=strong", "trainer.seed=7"))
    assert losses(first) == losses(second)
    assert first["test"]["macro_f1"] == second["test"]["macro_f1"]
    assert first["test"]["confusion"].tolist() == second["test"]["confusion"].tolist()
    assert losses(first) != losses(other_seed)


def test_reproduce_run_matches_and_links(make_config, quick_overrides, capsys):
    original = train(make_config("trainer.deterministic=true"))
    status = reproduce_main([original["run_id"], *quick_overrides])
    output = capsys.readouterr().out
    assert status == 0, output
    assert "All metrics within tolerance." in output
    assert "data fingerprint" not in output
    client = MlflowClient(tracking_uri=original["tracking_uri"])
    (linked,) = client.search_runs(
        [original["experiment_id"]], filter_string=f"tags.`fungiexp.reproduces` = '{original['run_id']}'"
    )
    assert linked.data.metrics["test/macro_f1"] == client.get_run(original["run_id"]).data.metrics["test/macro_f1"]


def test_reproduce_with_other_seed_is_tagged(make_config, quick_overrides, tmp_path, capsys):
    original = train(make_config("trainer.deterministic=true"))
    overrides = [item for item in quick_overrides if not item.startswith("trainer.checkpoint_dir=")]
    status = reproduce_main([original["run_id"], *overrides, "trainer.seed=7", f"trainer.checkpoint_dir={tmp_path}/other"])
    output = capsys.readouterr().out
    # Another seed is another model: the comparison is shown, not judged.
    assert status == 0, output
    assert "Not judged: the overrides change the model (trainer.seed)" in output
    assert "trainer.seed: 42 then, 7 now (override)" in output
    assert "the overrides change the model (trainer.seed), so the metrics below are not expected to match" in output
    assert f"trainer.checkpoint_dir: {tmp_path}/checkpoints then, {tmp_path}/other now (override)" in output
    client = MlflowClient(tracking_uri=original["tracking_uri"])
    (rerun,) = client.search_runs(
        [original["experiment_id"]], filter_string=f"tags.`fungiexp.reproduces` = '{original['run_id']}'"
    )
    # Only the seed counts as a change: where checkpoints lie does not change the model.
    assert rerun.data.tags["fungiexp.reproduce.changed"] == "trainer.seed"
    assert rerun.info.run_name.endswith(" trainer.seed=7")
    assert rerun.data.tags["fungiexp.reproduce.passed"] == "not_judged"
    logged = Path(client.download_artifacts(rerun.info.run_id, "reproduce/comparison.txt", str(tmp_path))).read_text()
    assert "Not judged: the overrides change the model (trainer.seed)" in logged


def test_reproduce_of_evaluate_run_trains_original(make_config, quick_overrides, capsys):
    from fungiexp.reevaluate import evaluate_main

    original = train(make_config("trainer.deterministic=true"))
    store = ["--tracking-uri", original["tracking_uri"]]
    assert evaluate_main([original["run_id"], *store, "evaluation.tta=true", "evaluation.tta_views=dihedral"]) == 0
    client = MlflowClient(tracking_uri=original["tracking_uri"])
    (evaluated,) = client.search_runs(
        [original["experiment_id"]], filter_string=f"tags.`fungiexp.evaluates` = '{original['run_id']}'"
    )
    capsys.readouterr()

    status = reproduce_main([evaluated.info.run_id, *quick_overrides])
    output = capsys.readouterr().out
    assert status == 0, output
    assert f"scored the model of run {original['run_id']} again" in output
    assert "All metrics within tolerance." in output


def test_reproduce_run_reports_changed_data(synthetic_root, make_config, quick_overrides, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    original = train(make_config(f"dataset.root={root}", "trainer.deterministic=true"))
    changed = root / "TSH" / "H1_1a_1.jpg"
    changed.write_bytes(changed.read_bytes() + b"\0")
    store_only = [item for item in quick_overrides if item.startswith(("tracking.", "trainer.checkpoint_dir"))]
    reproduce_main([original["run_id"], *store_only])
    output = capsys.readouterr().out
    before_training = output.split("Comparison with")[0]
    assert "data fingerprint (image contents):" in before_training


def test_doctored_experiment_fails(synthetic_root, tmp_path, quick_overrides, monkeypatch, capsys):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf, symlinks=False)
    (conf / "experiment" / "doctored.yaml").write_text(
        "# @package _global_\n"
        "reported:\n"
        "  source: a doctored value\n"
        "  tolerance: 0.01\n"
        "  metrics:\n"
        "    test/accuracy: 1.5\n"
        "  maximum:\n"
        "    test/H1/f1: 1.0\n"
    )
    monkeypatch.setenv("FUNGIEXP_CONFIG_DIR", str(conf))
    status = reproduce_main([str(conf / "experiment" / "doctored.yaml"), *quick_overrides])
    output = capsys.readouterr().out
    assert status == 1
    assert "Outside tolerance: test/accuracy" in output
    row = next(line for line in output.splitlines() if line.startswith("test/accuracy"))
    assert row.rstrip().endswith("NO")


def test_seed_mean_is_compared(tmp_path, quick_overrides, monkeypatch, capsys):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf, symlinks=False)
    (conf / "experiment" / "seeded.yaml").write_text(
        "# @package _global_\n"
        "reported:\n"
        "  tolerance: 0.01\n"
        "  metrics:\n"
        "    test/accuracy: 0.5\n"
        "  seeds: [1, 2]\n"
        "  mean:\n"
        "    test/accuracy: 1.5\n"
    )
    monkeypatch.setenv("FUNGIEXP_CONFIG_DIR", str(conf))
    status = reproduce_main([str(conf / "experiment" / "seeded.yaml"), "--seeds", *quick_overrides])
    output = capsys.readouterr().out

    assert status == 1
    assert "the mean over seeds [1, 2]" in output
    client = MlflowClient(tracking_uri=next(item for item in quick_overrides if item.startswith("tracking.uri=")).split("=", 1)[1])
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert sorted(run.data.params["trainer.seed"] for run in runs) == ["1", "2"]


def test_experiment_needing_imagenet_stops(quick_overrides, capsys):
    status = reproduce_main(["experiments/notebook_vgg16_block5.yaml", *quick_overrides])
    assert status == 1
    assert "needs what this machine lacks: VGG16 ImageNet weights" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["notebook_vgg16_block5", "notebook_small_cnn"])
def test_notebook_experiments_run_with_random_weights(name, quick_overrides, capsys):
    shrink = ["dataset.image_size=[32,32]", "model.head.dense_units=8", "trainer.epochs=1"]
    status = reproduce_main([f"experiments/{name}.yaml", *quick_overrides, *shrink, "model.weights=null", "--accept-differences"])
    output = capsys.readouterr().out
    assert "Comparison with" in output
    assert status in (0, 1)


def test_reproduce_without_arguments(capsys):
    with pytest.raises(SystemExit):
        reproduce_main([])
    error = capsys.readouterr().err
    assert "the following argument is required: target" in error
    assert "overrides" not in error.splitlines()[-1]


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({}, "has no test metrics to compare with (status KILLED): it did not finish. It left no checkpoint to resume, so train a new run."),
        ({"fungiexp.command": "fungiexp train trainer.epochs=1"}, "no checkpoint to resume, so train a new run: fungiexp train trainer.epochs=1"),
        ({"fungiexp.resume_command": "fungiexp train trainer.resume=abc"}, "it did not finish. Finish it first with: fungiexp train trainer.resume=abc"),
        ({"fungiexp.sweep.role": "parent"}, "is the parent run of a sweep"),
    ],
)
def test_reproduce_refuses_run_without_test_metrics(quick_overrides, tags, message, capsys):
    store = [item for item in quick_overrides if item.startswith("tracking.")]
    uri = next(item for item in store if item.startswith("tracking.uri=")).split("=", 1)[1]
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("test")
    run = client.create_run(experiment_id, tags=tags)
    client.log_metric(run.info.run_id, "val/accuracy", 0.5)
    client.set_terminated(run.info.run_id, "KILLED")

    assert reproduce_main([run.info.run_id, *store]) == 1
    error = capsys.readouterr().err
    assert message in error
    assert "Comparison with" not in error


def test_overrides_are_listed_as_differences():
    logged = compose_config([])
    merged = compose_config(["trainer.epochs=1", "dataset.image_size=[32,32]"])
    changed = changed_by_overrides(logged, merged, ["trainer.epochs=1", "dataset.image_size=[32,32]", "tracking.experiment=x", "trainer.seed=42"])
    assert changed == {
        "trainer.epochs": (logged.trainer.epochs, 1),
        "dataset.image_size": ([128, 128], [32, 32]),
    }


def test_reproduce_bare_experiment_name(capsys):
    assert reproduce_main(["defungi5_small_cnn_quick"]) == 1
    assert "is an experiment name; pass the file, experiments/defungi5_small_cnn_quick.yaml" in capsys.readouterr().err
    assert reproduce_main(["experiments/defungi5_small_cnn_quik.yaml"]) == 1
    assert "defungi5_small_cnn_quick.yaml" in capsys.readouterr().err


def test_comparison_table_marks_bounds():
    reported = compose_config(["+experiment=notebook_vgg16_block5"]).reported
    rows = compare_metrics(reported, {"test/accuracy": 0.40, "test/H3/f1": 0.30}, 0.05)
    table = format_table(rows)
    assert "test/accuracy" in table
    by_name = {row["metric"]: row for row in rows}
    assert by_name["test/accuracy"]["passed"]
    assert not by_name["test/H3/f1"]["passed"]
    assert not by_name["test/H2/recall"]["passed"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    cfg = compose_config([f"+experiment={name}"])
    assert cfg.reported is not None


@pytest.mark.real_data
@pytest.mark.skipif(not DEFUNGI_ZIP.is_file(), reason=f"DeFungi archive not found at {DEFUNGI_ZIP}")
def test_quick_reference_reproduces_on_real_data(tmp_path, capsys):
    status = reproduce_main(
        [
            "experiments/defungi5_small_cnn_quick.yaml",
            f"dataset.root={tmp_path}/defungi",
            f"dataset.source={DEFUNGI_ZIP}",
            f"dataset.cache_dir={tmp_path}/cache",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/artifacts",
            f"trainer.checkpoint_dir={tmp_path}/checkpoints",
            "trainer.verbose=0",
        ]
    )
    output = capsys.readouterr().out
    assert status == 0, output
    assert "All metrics within tolerance." in output


def test_untracked_outside_src_not_dirty():
    from fungiexp.tracking import has_changes

    assert not has_changes("")
    # Images copied in for predict leave the checkout as it was.
    assert not has_changes("?? new_images/\n?? notes.txt\n")
    assert has_changes("?? src/fungiexp/extra.py\n")
    assert has_changes('?? "src/fungiexp/caf\\303\\251.py"\n')
    assert has_changes(" M conf/config.yaml\n?? notes.txt\n")
