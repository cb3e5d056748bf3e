"""`fungiexp compare` and `fungiexp ui`: look at runs side by side, in the terminal or in MLflow's UI."""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

from fungiexp.errors import ConfigError, FungiexpError

# Keys that describe where a run went or how it was logged, not what it tried.
IGNORED_PARAM_PREFIXES = (
    "tracking.",
    "reported.",
    "dataset.root",
    "dataset.source",
    "dataset.cache_dir",
    "dataset.split.manifest",
    "trainer.checkpoint_dir",
    "trainer.verbose",
    "trainer.resume",
    "model.trainable_params",
    "model.frozen_params",
)
# Keys whose runs are repeats of one setting, for --aggregate.
REPEAT_KEYS = ("trainer.seed", "dataset.split.fold")

DESCRIPTION = """\
List the finished runs of an experiment or of one sweep: the parameters that
differ between them and the chosen metrics, sorted by a metric.

  fungiexp compare                          # runs of tracking.experiment
  fungiexp compare --sweep last --plot augmentation.name,fine_tune.name
  fungiexp compare --aggregate              # mean, std and count over seeds and folds
"""


def compare_main(args: list[str]) -> int:
    """Run `fungiexp compare` and return the exit status."""
    parser = argparse.ArgumentParser(prog="fungiexp compare", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment of the config)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: tracking.uri of the config)")
    parser.add_argument("--sweep", help="parent run id of a sweep, or `last` for the newest sweep")
    parser.add_argument("--metrics", help="comma-separated metrics (default: test/accuracy, test/macro_f1, per-class recall)")
    parser.add_argument("--sort", help="metric to sort by, highest first; shown as a column (default: test/macro_f1)")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    parser.add_argument("--aggregate", action="store_true", help="group runs that differ only in trainer.seed or dataset.split.fold")
    parser.add_argument("--plot", help="one or two parameters to plot the sort metric against, comma-separated")
    parser.add_argument(
        "--plot-file", default="outputs/compare.png", help="where to save the plot (default: outputs/compare.png, git-ignored)"
    )
    options = parser.parse_args(args)
    try:
        return run_compare(options)
    except FungiexpError as error:
        print(f"fungiexp compare: error: {error}", file=sys.stderr)
        return 1


def run_compare(options) -> int:
    """Fetch the runs, build the table, print it and write the optional CSV and plot."""
    uri, experiment = _defaults(options)
    require_store(uri)
    runs = _fetch_runs(uri, experiment)
    parent = _sweep_parent(options.sweep, runs, experiment)
    parent_status = next((run.info.status for run in runs if run.info.run_id == parent), None)
    runs = [
        run
        for run in runs
        if run.data.tags.get("fungiexp.sweep.role") != "parent"
        and (parent is None or run.data.tags.get("fungiexp.sweep.parent") == parent)
    ]
    unfinished = unfinished_note(runs)
    runs = [run for run in runs if run.info.status == "FINISHED"]
    # Say which runs these are: a sweep may have logged to another experiment than the default.
    scope = f"sweep {parent[:8]}" if parent else "all finished runs"
    if parent_status in ("KILLED", "FAILED"):
        scope += f", which ended as {parent_status}"
    elif parent_status == "RUNNING":
        scope += ", still running"
    if not runs:
        print(f"No finished runs in experiment {experiment!r}{f' for sweep {parent[:8]}' if parent else ''}.")
        if unfinished:
            print(unfinished)
        return 1

    varying = differing_params(runs)
    metrics, sort = choose_metrics(options.metrics, options.sort, runs)
    if options.plot:
        check_plot_params(options.plot.split(","), varying)
    hint = "" if getattr(options, "experiment", None) else " (--experiment NAME for another experiment)"
    print(f"Experiment {experiment!r}, {scope}: {len(runs)} run{'' if len(runs) == 1 else 's'}{hint}")
    if unfinished:
        print(unfinished)
    defaults = schema_default_params()
    kinds = {run.info.run_id: run_kind(run) for run in runs}
    show_kind = any(kind != "train" for kind in kinds.values())
    rows = [
        {
            "run": run.info.run_id[:8],
            **({"made by": kinds[run.info.run_id]} if show_kind else {}),
            **{key: run.data.params.get(key, defaults.get(key, "")) for key in varying},
            **{metric: run.data.metrics.get(metric, math.nan) for metric in metrics},
        }
        for run in runs
    ]
    if options.aggregate:
        rows = aggregate(rows, [key for key in varying if key not in REPEAT_KEYS], metrics, [model_id(run) for run in runs])
        merged = len(runs) - sum(row["runs"] for row in rows)
        if merged:
            print(
                f"({merged} run{' was' if merged == 1 else 's were'} another scoring or rerun of a model already counted, "
                "so the newest of each counts once)"
            )
    sort_key = sort if sort in rows[0] else f"{sort} mean"
    rows.sort(key=lambda row: -_number(row.get(sort_key)))

    printed = mean_std_cells(rows, metrics) if options.aggregate else rows
    visible_columns = [column for column in printed[0] if column not in following_columns(printed, varying)]
    print(format_rows(printed, visible_columns))
    if len(visible_columns) < len(printed[0]):
        print(f"({len(printed[0]) - len(visible_columns)} columns hidden: their values follow a config group's name; --csv FILE writes them all)")
    if options.csv:
        Path(options.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(options.csv, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"Wrote {len(rows)} rows to {options.csv}")
    if options.plot:
        figure = plot_metric(rows, options.plot.split(","), sort_key)
        Path(options.plot_file).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(options.plot_file, dpi=120)
        print(f"Saved the plot to {options.plot_file}")
        if parent:
            from mlflow.tracking import MlflowClient

            from fungiexp.tracking import resolve_tracking_uri

            MlflowClient(tracking_uri=resolve_tracking_uri(uri)).log_artifact(parent, options.plot_file, "compare")
            print(f"Logged the plot to sweep run {parent}")
    return 0


def unfinished_note(runs, max_ids: int = 5) -> str:
    """Return a line that counts the runs left out of the table because they did not finish, or ''.

    The line gives the ids of up to ``max_ids`` interrupted runs that left a
    checkpoint, which `fungiexp train trainer.resume=ID` continues.
    """
    from collections import Counter

    from fungiexp.tracking import RESUME_TAG

    unfinished = [run for run in runs if run.info.status != "FINISHED"]
    if not unfinished:
        return ""
    counts = Counter(run.info.status for run in unfinished)
    listed = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    resumable = [run.info.run_id[:8] for run in unfinished if RESUME_TAG in run.data.tags]
    hint = ""
    if resumable:
        more = f" (and {len(resumable) - max_ids} more)" if len(resumable) > max_ids else ""
        hint = f" Continue an interrupted one with: fungiexp train trainer.resume=ID, where ID is one of {', '.join(resumable[:max_ids])}{more}."
    return f"Not shown, because they did not finish: {listed}.{hint}"


def _fetch_runs(uri: str, experiment: str) -> list:
    """Return the active runs of ``experiment``, newest first.

    A local SQLite store is read directly (see fungiexp.runstore), which takes
    a fraction of a second; other stores go through MLflow's client.
    """
    from fungiexp.runstore import ExperimentNotFound, read_runs

    missing = ConfigError("--experiment", f"experiment {experiment!r} not found in {uri}.")
    try:
        runs = read_runs(uri, experiment)
    except ExperimentNotFound as error:
        if error.names:
            missing = ConfigError("--experiment", f"experiment {experiment!r} not found in {uri}; experiments there: {', '.join(error.names)}.")
        raise missing from None
    if runs is not None:
        return runs
    from mlflow.tracking import MlflowClient

    from fungiexp.tracking import resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise missing
    return client.search_runs([found.experiment_id], max_results=5000)


def differing_params(runs) -> list[str]:
    """Return the parameter keys whose values differ between ``runs``, except bookkeeping keys.

    A key that a run did not log counts as its schema default: runs made by
    `fungiexp reproduce RUN_ID`, which fills a logged config with the
    defaults, log ``optimizer.momentum`` for Adam while trained runs do not.
    """
    defaults = schema_default_params()
    keys = sorted({key for run in runs for key in run.data.params})
    return [
        key
        for key in keys
        if not key.startswith(IGNORED_PARAM_PREFIXES)
        and not key.startswith("data.")
        and len({run.data.params.get(key, defaults.get(key)) for run in runs}) > 1
    ]


# Set on a reproduce RUN_ID run whose command-line overrides changed the logged config: the keys they changed.
REPRODUCE_CHANGED_TAG = "fungiexp.reproduce.changed"


def model_id(run) -> str:
    """Return the id of the run whose model ``run`` scores.

    A run of fungiexp evaluate scores the model of the run it names again,
    and one of fungiexp reproduce RUN_ID trains that model again with the same
    config. A reproduce run whose overrides changed the config (another seed,
    for example) trained a model of its own.
    """
    tags = run.data.tags
    if tags.get("fungiexp.evaluates"):
        return tags["fungiexp.evaluates"]
    if tags.get("fungiexp.reproduces") and not tags.get(REPRODUCE_CHANGED_TAG):
        return tags["fungiexp.reproduces"]
    return run.info.run_id


def run_kind(run) -> str:
    """Say which command made ``run``: train, or evaluate or reproduce of another run."""
    tags = run.data.tags
    if tags.get("fungiexp.evaluates"):
        return f"evaluate {tags['fungiexp.evaluates'][:8]}"
    if tags.get("fungiexp.reproduces"):
        return f"reproduce {tags['fungiexp.reproduces'][:8]}"
    if tags.get("fungiexp.reproduce.experiment"):
        return f"reproduce {tags['fungiexp.reproduce.experiment']}"
    return "train"


def check_plot_params(params: list[str], varying: list[str]) -> None:
    """Raise a ConfigError naming the close names when a --plot parameter does not vary between the runs."""
    import difflib

    if len(params) > 2:
        raise ConfigError("--plot", f"give one or two parameters, not {len(params)}.")
    for param in params:
        if param in varying:
            continue
        close = difflib.get_close_matches(param, varying, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError("--plot", f"parameter {param!r} does not vary between these runs; {hint}varying: {', '.join(varying) or 'none'}.")


def schema_default_params() -> dict[str, str]:
    """Return the schema's default of each config key, as a logged parameter string."""
    import json

    from omegaconf import OmegaConf

    from fungiexp.schema import RunSchema

    defaults = OmegaConf.to_container(OmegaConf.structured(RunSchema), resolve=False)
    defaults.pop("reported", None)
    flat: dict[str, str] = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), child)
        elif value != "???":
            # Formatted as fungiexp.tracking.flatten_config does. That module imports MLflow
            # (about 2 s here), which compare skips for a SQLite store.
            flat[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    visit("", defaults)
    return flat


def aggregate(rows: list[dict], group_keys: list[str], metrics: list[str], models: list[str] | None = None) -> list[dict]:
    """Group rows by ``group_keys`` and give mean, standard deviation and count of each metric.

    ``models`` names the trained model of each row. A model that appears
    twice in one group (a run and its re-scoring by fungiexp evaluate with
    the same settings) counts once, with the scores of its first row, which
    is the newest when rows come newest first.
    """
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    seen: set[tuple] = set()
    for index, row in enumerate(rows):
        group = tuple(row.get(key, "") for key in group_keys)
        model = models[index] if models is not None else index
        if (group, model) in seen:
            continue
        seen.add((group, model))
        groups.setdefault(group, []).append(row)
    result = []
    for values, members in groups.items():
        entry = dict(zip(group_keys, values))
        entry["runs"] = len(members)
        for metric in metrics:
            numbers = np.array([member[metric] for member in members], dtype=float)
            numbers = numbers[~np.isnan(numbers)]
            entry[f"{metric} mean"] = float(numbers.mean()) if len(numbers) else math.nan
            entry[f"{metric} std"] = float(numbers.std(ddof=1)) if len(numbers) > 1 else math.nan
        result.append(entry)
    return result


def mean_std_cells(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Return aggregated rows with each metric's mean and standard deviation in one "mean +/- std" cell.

    This halves the width of the printed table. A group of one run shows its
    value alone.
    """
    merged = []
    for row in rows:
        entry = {key: value for key, value in row.items() if not key.endswith((" mean", " std"))}
        for metric in metrics:
            mean, std = row[f"{metric} mean"], row[f"{metric} std"]
            entry[metric] = mean if math.isnan(std) else f"{mean:.4f} +/- {std:.4f}"
        merged.append(entry)
    return merged


def following_columns(rows: list[dict], varying: list[str]) -> set[str]:
    """Return the parameter columns whose value is fixed by their config group's name.

    In a sweep over ``augmentation=none,notebook,strong`` each augmentation
    key changes with ``augmentation.name``; the name alone says what differs.
    A key that also varies within one name (an override on top of a group
    option) stays shown.
    """
    hidden = set()
    for key in varying:
        group, _, leaf = key.partition(".")
        name = f"{group}.name"
        if leaf == "name" or name not in varying or key not in rows[0]:
            continue
        values: dict[str, set] = {}
        for row in rows:
            values.setdefault(row.get(name), set()).add(row.get(key))
        if all(len(found) == 1 for found in values.values()):
            hidden.add(key)
    return hidden


def format_rows(rows: list[dict], columns: list[str] | None = None) -> str:
    """Format rows as a fixed-width table, numbers with four decimals.

    Values are spelled as on the command line (null, true, false rather
    than the None, True, False that MLflow stores), and a missing value
    (nan), such as a metric that a run did not log, shows as "-". The CSV
    keeps the stored spelling.
    """
    columns = list(rows[0]) if columns is None else columns
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[index]) for line in cells)) for index, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths)).rstrip()]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines)


def plot_metric(rows: list[dict], params: list[str], metric: str):
    """Plot ``metric`` against one parameter (bars) or two (a grid of values)."""
    import numpy as np
    from matplotlib.figure import Figure

    check_plot_params(params, [key for key in rows[0] if "/" not in key and key not in ("run", "runs", "made by")])
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    if len(params) == 1:
        labels = [str(row[params[0]]) for row in rows]
        axes.bar(range(len(rows)), [_number(row[metric]) for row in rows])
        axes.set_xticks(range(len(rows)), labels=labels, rotation=30, ha="right")
        axes.set_xlabel(params[0])
        axes.set_ylabel(metric)
    else:
        xs = sorted({str(row[params[0]]) for row in rows})
        ys = sorted({str(row[params[1]]) for row in rows})
        grid = np.full((len(ys), len(xs)), np.nan)
        for row in rows:
            grid[ys.index(str(row[params[1]])), xs.index(str(row[params[0]]))] = _number(row[metric])
        image = axes.imshow(grid, cmap="viridis")
        figure.colorbar(image, ax=axes, label=metric)
        axes.set_xticks(range(len(xs)), labels=xs)
        axes.set_yticks(range(len(ys)), labels=ys)
        axes.set_xlabel(params[0])
        axes.set_ylabel(params[1])
        for y in range(len(ys)):
            for x in range(len(xs)):
                if not np.isnan(grid[y, x]):
                    axes.text(x, y, f"{grid[y, x]:.3f}", ha="center", va="center", color="white")
    axes.set_title(f"{metric} by {' and '.join(params)}")
    return figure


def ui_main(args: list[str]) -> int:
    """Start the MLflow UI on the project's store, bound to 127.0.0.1 unless --host sets another address."""
    parser = argparse.ArgumentParser(prog="fungiexp ui", description="Open the MLflow UI on the project's store.")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on (default: 5000)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: tracking.uri of the config)")
    options = parser.parse_args(args)
    from fungiexp.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(options.tracking_uri or _defaults(options)[0])
    program = Path(sys.executable).parent / "mlflow"
    command = [str(program) if program.is_file() else "mlflow", "ui", "--backend-store-uri", uri, "--host", options.host, "--port", str(options.port)]
    print(f"Opening the MLflow UI on http://{options.host}:{options.port} for {uri}")
    # The UI replaces this process, so Ctrl-C stops the server itself.
    os.execvp(command[0], command)
    return 0


def require_store(uri: str) -> None:
    """Raise ConfigError if ``uri`` is an SQLite store that does not exist yet.

    Commands that only read runs must not create an empty store in the
    working directory.
    """
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).expanduser().resolve().is_file():
        raise ConfigError(
            "tracking.uri",
            f"no MLflow store at {uri} (relative to {Path.cwd()}). Run the command in the project folder, "
            "or pass --tracking-uri.",
        )


def _defaults(options) -> tuple[str, str]:
    from fungiexp.datacli import compose_config

    tracking = compose_config([]).tracking
    return (getattr(options, "tracking_uri", None) or str(tracking.uri), getattr(options, "experiment", None) or str(tracking.experiment))


def _sweep_parent(sweep: str | None, runs, experiment: str) -> str | None:
    if sweep is None:
        return None
    parents = [run for run in runs if run.data.tags.get("fungiexp.sweep.role") == "parent"]
    if sweep == "last":
        if not parents:
            raise ConfigError(
                "--sweep",
                f"no sweep in experiment {experiment!r}; pass --experiment NAME for another experiment, "
                "or run `fungiexp train -m ...` first.",
            )
        return max(parents, key=lambda run: run.info.start_time).info.run_id
    # The 8-character ids that compare prints are enough.
    matches = [run.info.run_id for run in parents if run.info.run_id.startswith(sweep)]
    if len(matches) != 1:
        if matches:
            raise ConfigError("--sweep", f"{sweep!r} matches several sweeps in experiment {experiment!r}; give more characters.")
        raise ConfigError(
            "--sweep",
            f"{sweep!r} is not the parent run of a sweep in experiment {experiment!r}; "
            "pass --experiment NAME if the sweep logged to another experiment.",
        )
    return matches[0]


def choose_metrics(option: str | None, sort: str | None, runs) -> tuple[list[str], str]:
    """Return the metric columns and the sort metric for ``runs``.

    A name given with --metrics or --sort must have been logged by at least
    one run. A typo raises a ConfigError that suggests close names, where it
    would otherwise print a column of nan. When --metrics leaves the sort
    metric out, it is added as a column so that the order can be read.
    """
    known = {name for run in runs for name in run.data.metrics}
    if option:
        metrics = [name.strip() for name in option.split(",") if name.strip()]
        _check_logged("--metrics", metrics, known)
    else:
        recalls = sorted(name for name in known if name.startswith("test/") and name.endswith("/recall") and name.count("/") == 2)
        metrics = ["test/accuracy", "test/macro_f1", *recalls]
    if sort is None:
        sort = "test/macro_f1"
    else:
        _check_logged("--sort", [sort], known)
    if sort not in metrics:
        metrics.append(sort)
    return metrics, sort


def _check_logged(option: str, names: list[str], known: set[str]) -> None:
    import difflib

    for name in names:
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "metric names look like test/macro_f1 or test/H1/recall."
        raise ConfigError(option, f"no run here logged a metric named {name!r}; {hint} The run page in `fungiexp ui` lists every metric.")


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return -math.inf
    return -math.inf if math.isnan(number) else number


# Logged values in Python's spelling, mapped to the spelling of overrides.
_YAML_SPELLING = {"None": "null", "True": "true", "False": "false"}


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    text = str(value)
    if text.startswith("[") and text.endswith("]"):
        return _list_override(text)
    return _YAML_SPELLING.get(text, text)


def _list_override(text: str) -> str:
    """Spell a logged list (``[32, 32]``, ``['H1', 'H2']``) as an override writes it: ``[32,32]``, ``[H1,H2]``."""
    import ast

    try:
        items = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if not isinstance(items, list) or any(isinstance(item, (list, dict)) for item in items):
        return text
    return "[" + ",".join(_YAML_SPELLING.get(str(item), str(item)) for item in items) + "]"
