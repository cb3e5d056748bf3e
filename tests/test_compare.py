"""`fungiexp compare` over sweeps."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from fungiexp.compare import (
    aggregate,
    check_plot_params,
    choose_metrics,
    differing_params,
    following_columns,
    format_rows,
    mean_std_cells,
    model_id,
    run_kind,
)
from fungiexp.errors import ConfigError



def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fungiexp", *args], cwd=cwd, capture_output=True, text=True, timeout=900, env={**os.environ}
    )


@pytest.mark.slow
def test_compare_lists_sweep_with_swept_columns(quick_overrides, tmp_path):
    swept = run_cli(
        "train", "-m", *quick_overrides, "augmentation=none,notebook,strong", "optimizer=adam,sgd", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path
    )
    assert swept.returncode == 0, swept.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    compared = run_cli(
        "compare",
        "--tracking-uri",
        uri,
        "--experiment",
        "test",
        "--sweep",
        "last",
        "--csv",
        str(tmp_path / "table.csv"),
        "--plot",
        "augmentation.name,optimizer.name",
        "--plot-file",
        str(tmp_path / "plot.png"),
        cwd=tmp_path,
    )
    assert compared.returncode == 0, compared.stderr[-3000:]
    with open(tmp_path / "table.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 6
    assert {"augmentation.name", "optimizer.name", "test/macro_f1", "test/H1/recall"} <= set(rows[0])
    assert {(row["augmentation.name"], row["optimizer.name"]) for row in rows} == {
        (augmentation, optimizer) for augmentation in ("none", "notebook", "strong") for optimizer in ("adam", "sgd")
    }
    scores = [float(row["test/macro_f1"]) for row in rows]
    assert scores == sorted(scores, reverse=True)

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("test")
    (parent,) = [run for run in client.search_runs([experiment.experiment_id]) if run.data.tags.get("fungiexp.sweep.role") == "parent"]
    assert [info.path for info in client.list_artifacts(parent.info.run_id, "compare")] == ["compare/plot.png"]


def test_aggregate_counts_rescored_model_once():
    rows = [
        {"run": "c", "trainer.seed": "1", "test/macro_f1": 0.70},
        {"run": "a", "trainer.seed": "1", "test/macro_f1": 0.60},
        {"run": "b", "trainer.seed": "2", "test/macro_f1": 0.80},
    ]
    # Run c re-scored the model of run a with the same settings.
    (row,) = aggregate(rows, [], ["test/macro_f1"], models=["a", "a", "b"])
    assert row["runs"] == 2
    assert row["test/macro_f1 mean"] == pytest.approx(0.75)


def test_format_rows_one_run_group():
    rows = [
        {"run": "a", "model.weights": "None", "trainer.deterministic": "True", "trainer.seed": "1", "test/macro_f1": 0.6},
        {"run": "b", "model.weights": "None", "trainer.deterministic": "True", "trainer.seed": "2", "test/macro_f1": 0.8},
        {"run": "c", "model.weights": "imagenet", "trainer.deterministic": "False", "trainer.seed": "1", "test/macro_f1": 0.7},
    ]
    grouped = aggregate(rows, ["model.weights", "trainer.deterministic"], ["test/macro_f1"])
    lines = format_rows(grouped).splitlines()
    assert lines[1].split() == ["null", "true", "2", "0.7000", "0.1414"]
    # One run has no standard deviation.
    assert lines[2].split() == ["imagenet", "false", "1", "0.7000", "-"]
    assert all(line == line.rstrip() for line in lines)
    # The printed table puts mean and standard deviation into one cell.
    merged = format_rows(mean_std_cells(grouped, ["test/macro_f1"])).splitlines()
    assert merged[0].split() == ["model.weights", "trainer.deterministic", "runs", "test/macro_f1"]
    assert merged[1].endswith("0.7000 +/- 0.1414")
    assert merged[2].endswith("0.7000")


def test_logged_lists_print_as_overrides():
    rows = [{"run": "a", "dataset.image_size": "[32, 32]", "dataset.classes": "['H1', 'H2']", "model.head": "[True, None]", "text": "[not a list"}]
    lines = format_rows(rows).splitlines()
    assert lines[1].split() == ["a", "[32,32]", "[H1,H2]", "[true,null]", "[not", "a", "list"]


@pytest.mark.slow
def test_compare_aggregates_seeds(quick_overrides, tmp_path):
    swept = run_cli("train", "-m", *quick_overrides, "trainer.seed=1,2,3", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert swept.returncode == 0, swept.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name("test")
    (parent,) = [run for run in MlflowClient(tracking_uri=uri).search_runs([experiment.experiment_id]) if run.data.tags.get("fungiexp.sweep.role") == "parent"]
    # The sweep is named by the 8-character id that compare prints.
    sweep = parent.info.run_id[:8]
    compared = run_cli(
        "compare", "--tracking-uri", uri, "--experiment", "test", "--sweep", sweep, "--aggregate", "--csv", str(tmp_path / "agg.csv"), cwd=tmp_path
    )
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert f"Experiment 'test', sweep {sweep}: 3 runs" in compared.stdout
    with open(tmp_path / "agg.csv", newline="") as stream:
        (row,) = list(csv.DictReader(stream))
    assert row["runs"] == "3"
    assert {"test/macro_f1 mean", "test/macro_f1 std"} <= set(row)


def _logged(*names):
    return SimpleNamespace(data=SimpleNamespace(metrics={name: 0.5 for name in names}))


def test_choose_metrics_rejects_unlogged_names():
    runs = [_logged("test/accuracy", "test/macro_f1", "test/H1/recall"), _logged("test/balanced_accuracy")]
    with pytest.raises(ConfigError, match=r"--metrics: .*'test/macro_fl'.*did you mean test/macro_f1"):
        choose_metrics("test/accuracy,test/macro_fl", None, runs)
    with pytest.raises(ConfigError, match="--sort: .*'val/nothing'"):
        choose_metrics(None, "val/nothing", runs)
    # A metric that only some runs logged is accepted, and the sort metric becomes a column.
    metrics, sort = choose_metrics("test/accuracy", "test/balanced_accuracy", runs)
    assert metrics == ["test/accuracy", "test/balanced_accuracy"]
    assert sort == "test/balanced_accuracy"
    assert choose_metrics(None, None, runs) == (["test/accuracy", "test/macro_f1", "test/H1/recall"], "test/macro_f1")


def _with_params(**params):
    return SimpleNamespace(data=SimpleNamespace(params={key.replace("__", "."): value for key, value in params.items()}))


def test_differing_params_fills_schema_defaults():
    trained = _with_params(optimizer__name="adam", trainer__seed="1")
    # fungiexp reproduce RUN_ID fills the logged config with the schema's defaults.
    reproduced = _with_params(optimizer__name="adam", optimizer__momentum="0.0", optimizer__nesterov="False", trainer__seed="2")
    assert differing_params([trained, reproduced]) == ["trainer.seed"]
    with_momentum = _with_params(optimizer__name="adam", optimizer__momentum="0.9", trainer__seed="1")
    assert differing_params([trained, with_momentum]) == ["optimizer.momentum"]


def test_following_columns_hide_group_keys():
    rows = [
        {"augmentation.name": "none", "augmentation.flip": "False", "augmentation.zoom": "0.0", "test/macro_f1": 0.5},
        {"augmentation.name": "strong", "augmentation.flip": "True", "augmentation.zoom": "0.1", "test/macro_f1": 0.6},
        {"augmentation.name": "strong", "augmentation.flip": "True", "augmentation.zoom": "0.2", "test/macro_f1": 0.7},
    ]
    varying = ["augmentation.flip", "augmentation.name", "augmentation.zoom"]
    # The zoom was overridden within one option, so it stays.
    assert following_columns(rows, varying) == {"augmentation.flip"}


def test_plot_parameter_typo_suggests_varying_name():
    with pytest.raises(ConfigError, match=r"--plot: parameter 'augmentation.nme' does not vary.*did you mean augmentation.name\?"):
        check_plot_params(["augmentation.nme"], ["augmentation.name", "optimizer.name"])
    with pytest.raises(ConfigError, match="one or two parameters, not 3"):
        check_plot_params(["a", "b", "c"], ["a", "b", "c"])


def test_run_kind_names_the_making_command():
    def tagged(**tags):
        return SimpleNamespace(data=SimpleNamespace(tags={key.replace("__", "."): value for key, value in tags.items()}))

    assert run_kind(tagged()) == "train"
    assert run_kind(tagged(fungiexp__evaluates="300e2353abcdef")) == "evaluate 300e2353"
    assert run_kind(tagged(fungiexp__reproduces="1e9156bdabcdef")) == "reproduce 1e9156bd"


def test_model_id_follows_reruns():
    def run(run_id, **tags):
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(tags={key.replace("__", "."): value for key, value in tags.items()}))

    assert model_id(run("a1")) == "a1"
    assert model_id(run("b2", fungiexp__evaluates="a1")) == "a1"
    # A reproduce RUN_ID rerun counts as the same model in --aggregate.
    assert model_id(run("c3", fungiexp__reproduces="a1")) == "a1"
    # One whose overrides changed the config (here the seed) is a model of its own.
    assert model_id(run("d4", fungiexp__reproduces="a1", fungiexp__reproduce__changed="trainer.seed")) == "d4"


def test_closed_pipe_ends_quietly():
    # A reader such as head closes the pipe after its first lines.
    script = (
        "import sys\n"
        "from fungiexp import cli\n"
        "def lines(argv):\n"
        "    for _ in range(100000):\n"
        "        print('x' * 100)\n"
        "    return 0\n"
        "cli._dispatch = lines\n"
        "sys.exit(cli.main())\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    writer.stdout.readline()
    writer.stdout.close()
    with writer.stderr:
        error = writer.stderr.read().decode()
    assert writer.wait(timeout=60) == 1
    assert "BrokenPipeError" not in error


def test_compare_counts_unfinished_runs(tmp_path, capsys):
    from fungiexp.compare import compare_main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("test", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id, tags={"fungiexp.sweep.role": "parent"}).info.run_id
    client.set_terminated(parent, "KILLED")
    resume = {"fungiexp.resume_command": "fungiexp train trainer.resume=ID"}
    for seed, status in ((1, "FINISHED"), (2, "KILLED"), (3, "FAILED")):
        # The KILLED run left a checkpoint; the FAILED one did not.
        tags = {"fungiexp.sweep.parent": parent, **(resume if status == "KILLED" else {})}
        run = client.create_run(experiment_id, tags=tags).info.run_id
        if status == "KILLED":
            killed = run
        client.log_param(run, "trainer.seed", seed)
        client.log_metric(run, "test/macro_f1", 0.5)
        client.set_terminated(run, status)
    store = ["--tracking-uri", uri, "--experiment", "test", "--sweep", "last"]

    assert compare_main(store) == 0
    header, note = capsys.readouterr().out.splitlines()[:2]
    # --experiment was given, so the header does not suggest it.
    assert header == f"Experiment 'test', sweep {parent[:8]}, which ended as KILLED: 1 run"
    assert note == (
        "Not shown, because they did not finish: 1 FAILED, 1 KILLED. "
        f"Continue an interrupted one with: fungiexp train trainer.resume=ID, where ID is one of {killed[:8]}."
    )

    # A rerun of the finished run with its own config counts once with it.
    finished = next(run.info.run_id for run in client.search_runs([experiment_id]) if run.data.params.get("trainer.seed") == "1")
    rerun = client.create_run(experiment_id, tags={"fungiexp.sweep.parent": parent, "fungiexp.reproduces": finished}).info.run_id
    client.log_param(rerun, "trainer.seed", 1)
    client.log_metric(rerun, "test/macro_f1", 0.5)
    client.set_terminated(rerun, "FINISHED")
    assert compare_main([*store, "--aggregate"]) == 0
    output = capsys.readouterr().out
    assert "(1 run was another scoring or rerun of a model already counted, so the newest of each counts once)" in output

    client.delete_run(rerun)
    client.delete_run(finished)
    assert compare_main(store) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"No finished runs in experiment 'test' for sweep {parent[:8]}.",
        note,
    ]
    assert compare_main(["--tracking-uri", uri, "--experiment", "test", "--sweep", "0000"]) == 1
    assert "'0000' is not the parent run of a sweep in experiment 'test'" in capsys.readouterr().err
