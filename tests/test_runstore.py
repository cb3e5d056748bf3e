"""The direct reader of SQLite stores that `fungiexp compare` uses gives what MLflow's client gives."""

from __future__ import annotations

import math
import sqlite3

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from fungiexp.errors import ConfigError
from fungiexp.runstore import ExperimentNotFound, read_runs, resolve_run_id


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    chosen = client.create_experiment("chosen", artifact_location=str(tmp_path / "artifacts"))
    other = client.create_experiment("other", artifact_location=str(tmp_path / "artifacts"))
    for seed in (1, 2, 3):
        run = client.create_run(chosen, tags={"fungiexp.sweep.parent": "p1"}).info.run_id
        client.log_batch(
            run,
            metrics=[Metric("val/accuracy", 0.1 * step + seed, 1000 + step, step) for step in range(3)]
            + [Metric("test/macro_f1", 0.5 + seed / 100, 2000, 0), Metric("test/H2/recall", math.nan, 2000, 0)],
            params=[Param("trainer.seed", str(seed)), Param("model.name", "small_cnn")],
            tags=[RunTag("note", f"seed {seed}")],
        )
        client.set_terminated(run, "FINISHED" if seed != 3 else "FAILED")
    deleted = client.create_run(chosen).info.run_id
    client.delete_run(deleted)
    client.create_run(other)
    return uri, client, chosen


def test_reader_matches_mlflow_client(store):
    uri, client, chosen = store
    expected = {run.info.run_id: run for run in client.search_runs([chosen], max_results=5000)}
    found = read_runs(uri, "chosen")

    assert found is not None
    assert sorted(run.info.run_id for run in found) == sorted(expected)
    for run in found:
        reference = expected[run.info.run_id]
        assert run.info.status == reference.info.status
        assert run.info.start_time == reference.info.start_time
        assert run.data.params == reference.data.params
        assert run.data.tags == reference.data.tags
        assert run.data.metrics.keys() == reference.data.metrics.keys()
        for key, value in run.data.metrics.items():
            assert value == reference.data.metrics[key] or (math.isnan(value) and math.isnan(reference.data.metrics[key]))


def test_reader_keeps_latest_step_and_nan(store):
    uri, _, _ = store
    run = next(run for run in read_runs(uri, "chosen") if run.data.params["trainer.seed"] == "2")
    assert run.data.metrics["val/accuracy"] == pytest.approx(2.2)
    assert math.isnan(run.data.metrics["test/H2/recall"])


def test_reader_names_missing_experiment(store):
    uri, _, _ = store
    with pytest.raises(ExperimentNotFound) as raised:
        read_runs(uri, "absent")
    assert "chosen" in raised.value.names


def test_reader_declines_other_stores(tmp_path):
    assert read_runs("http://127.0.0.1:5000", "chosen") is None
    assert read_runs(f"sqlite:///{tmp_path / 'missing.db'}", "chosen") is None
    unexpected = tmp_path / "unexpected.db"
    with sqlite3.connect(unexpected) as connection:
        connection.execute("CREATE TABLE runs (run_uuid TEXT)")
    assert read_runs(f"sqlite:///{unexpected}", "chosen") is None


def test_run_id_prefix_resolves_to_full_id(store):
    uri, client, chosen = store
    run_ids = [run.info.run_id for run in client.search_runs([chosen])]
    target = run_ids[0]
    assert resolve_run_id(uri, target[:8]) == target
    assert resolve_run_id(uri, target) == target
    assert resolve_run_id(uri, "ffffffffzz") == "ffffffffzz"


def test_ambiguous_run_id_prefix_raises(store):
    uri, client, chosen = store
    # Seventeen hexadecimal ids always include two with the same first character.
    first = [run.info.run_id[0] for run in client.search_runs([chosen])]
    while len(set(first)) == len(first):
        first.append(client.create_run(chosen).info.run_id[0])
    shared = next(character for character in first if first.count(character) > 1)
    with pytest.raises(ConfigError, match="is the start of"):
        resolve_run_id(uri, shared)
