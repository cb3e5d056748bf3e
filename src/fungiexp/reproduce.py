"""`fungiexp reproduce`: rerun a reported experiment or a logged run and compare the numbers."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from fungiexp.errors import ConfigError, FungiexpError
from fungiexp.schema import with_defaults
from fungiexp.validate import check_overrides, merge_overrides

log = logging.getLogger(__name__)

# Cache path of the VGG16 ImageNet weights without the top (keras.applications, Keras 3).
IMAGENET_NOTOP = Path("~/.keras/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").expanduser()
REQUIREMENTS = {
    "imagenet_weights": (
        lambda: IMAGENET_NOTOP.is_file(),
        f"VGG16 ImageNet weights are not cached at {IMAGENET_NOTOP} and may not be downloadable here",
    ),
}

# Keys that locate files (data, caches, checkpoints). They do not change how the model trains.
LOCATION_KEYS = ("dataset.root", "dataset.source", "dataset.cache_dir", "trainer.checkpoint_dir")

DESCRIPTION = """\
Rerun a reported experiment or a logged MLflow run and compare its metrics.

  fungiexp reproduce experiments/NAME.yaml [OVERRIDES...]
      Runs `fungiexp train +experiment=NAME` and compares the test metrics with
      the file's `reported` block. Exits with status 1 when a metric is outside
      its tolerance.
  fungiexp reproduce experiments/NAME.yaml --seeds
      Runs the experiment once per seed of `reported.seeds` and compares the
      mean of each metric with `reported.mean`.
  fungiexp reproduce RUN_ID [OVERRIDES...]
      Reruns a logged run from its logged config and split, tags the new run
      with the original's id, and compares every test metric. Exits with
      status 1 when one differs. Overrides that change the model (another
      seed, say) make a new model: the comparison is then shown but not
      judged (status 0, tag fungiexp.reproduce.passed=not_judged).
"""


def reproduce_main(args: list[str]) -> int:
    """Run `fungiexp reproduce` and return the exit status."""
    parser = argparse.ArgumentParser(prog="fungiexp reproduce", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="experiments/NAME.yaml or an MLflow run id")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, for example model.weights=null")
    parser.add_argument(
        "--accept-differences",
        action="store_true",
        help="run even when the experiment needs something this machine lacks (its numbers will differ)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest accepted absolute difference per metric (default: the experiment's, or 0 for a run id)",
    )
    parser.add_argument(
        "--seeds",
        action="store_true",
        help="run every seed of the experiment's reported.seeds and compare the means with reported.mean",
    )
    if not args:
        # parse_intermixed_args would also report the optional overrides as missing.
        parser.error("the following argument is required: target")
    # Flags may come before or after the overrides.
    options = parser.parse_intermixed_args(args)

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    problem = check_overrides(options.overrides)
    if problem:
        print(f"fungiexp reproduce: error: {problem}", file=sys.stderr)
        return 1
    try:
        if options.target.endswith((".yaml", ".yml")):
            return reproduce_experiment(Path(options.target), options.overrides, options.accept_differences, options.tolerance, options.seeds)
        from fungiexp.app import config_dir

        named = Path("experiments") / f"{options.target}.yaml"
        if (config_dir() / "experiment" / named.name).is_file():
            raise ConfigError("target", f"{options.target!r} is an experiment name; pass the file, {named}.")
        return reproduce_run(options.target, options.overrides, 0.0 if options.tolerance is None else options.tolerance)
    except FungiexpError as error:
        print(f"fungiexp reproduce: error: {error}", file=sys.stderr)
        return 1


def reproduce_experiment(path: Path, overrides: list[str], accept_differences: bool, tolerance: float | None, seeds: bool = False) -> int:
    """Run an experiment file and compare its test metrics with its ``reported`` block.

    With ``seeds``, run it once per seed of ``reported.seeds`` and compare
    the mean of each metric with ``reported.mean``.
    """
    from fungiexp.app import config_dir
    from fungiexp.datacli import compose_config

    experiments = (config_dir() / "experiment").resolve()
    if not path.is_file():
        names = sorted(found.name for found in experiments.glob("*.yaml"))
        listing = f": {', '.join(names)}" if names else ""
        raise ConfigError("experiment", f"file {path} not found; experiment files live in {experiments}{listing}.")
    if path.resolve().parent != experiments:
        raise ConfigError("experiment", f"{path} is not in {experiments}; copy it there to run it.")
    cfg = compose_config([f"+experiment={path.stem}", *overrides])
    if not cfg.tracking.run_name:
        cfg.tracking.run_name = f"reproduce {path.stem}"
    if not cfg.get("reported") or not (cfg.reported.metrics or cfg.reported.maximum):
        raise ConfigError("reported", f"{path} has no reported metrics to compare with.")
    if seeds and not (cfg.reported.get("seeds") and cfg.reported.get("mean")):
        raise ConfigError("reported.seeds", f"{path} reports no per-seed mean; run it without --seeds.")

    missing = [name for name in cfg.reported.get("requires", []) if not REQUIREMENTS.get(name, (lambda: False, name))[0]()]
    if missing:
        reasons = "; ".join(REQUIREMENTS.get(name, (None, f"unknown requirement {name!r}"))[1] for name in missing)
        if not accept_differences:
            raise ConfigError(
                "reported.requires",
                f"{path.name} needs what this machine lacks: {reasons}. Provide it, or rerun with "
                "--accept-differences (and, for ImageNet weights, model.weights=null) knowing the numbers will differ.",
            )
        log.warning("Running without %s; the numbers will differ from the reported ones", ", ".join(missing))

    changed = [item for item in overrides if not item.lstrip("+~").startswith(("tracking.", "hydra."))]
    if changed:
        log.warning("Overrides change the experiment (%s); its reported numbers may not apply", " ".join(changed))
    if cfg.reported.get("notes"):
        log.info("Notes of %s: %s", path.name, cfg.reported.notes)

    from fungiexp.train import train

    limit = float(cfg.reported.get("tolerance", 0.0)) if tolerance is None else tolerance
    source = f"{path.name} ({cfg.reported.get('source', 'source not given')})"
    if seeds:
        results = []
        for seed in cfg.reported.seeds:
            log.info("Reproducing %s with trainer.seed=%s", path.name, seed)
            cfg.trainer.seed = int(seed)
            cfg.tracking.run_name = f"reproduce {path.stem} seed {seed}"
            results.append(train(cfg, tags={"fungiexp.reproduce.experiment": path.stem}))
        runs = [_run_metrics(result) for result in results]
        means = {name: float(np.mean([metrics.get(name, math.nan) for metrics in runs])) for name in cfg.reported.mean}
        for name in cfg.reported.mean:
            values = [metrics.get(name, math.nan) for metrics in runs]
            log.info("%s over %d seeds: mean %.4f, std %.4f", name, len(values), np.mean(values), np.std(values, ddof=1) if len(values) > 1 else 0.0)
        rows = compare_metrics(OmegaConf.create({"metrics": dict(cfg.reported.mean)}), means, limit)
        status = _report(rows, results[-1], f"the mean over seeds {list(cfg.reported.seeds)} of {source}")
    else:
        result = train(cfg, tags={"fungiexp.reproduce.experiment": path.stem})
        rows = compare_metrics(cfg.reported, _run_metrics(result), limit)
        status = _report(rows, result, source)
    if cfg.reported.get("notes"):
        print(f"Notes: {cfg.reported.notes}")
    return status


def reproduce_run(run_id: str, overrides: list[str], tolerance: float) -> int:
    """Rerun a logged run from its logged config and split, and compare every test metric."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from fungiexp import tracking
    from fungiexp.data import prepare_data
    from fungiexp.datacli import compose_config
    from fungiexp.reevaluate import EVALUATES_TAG
    from fungiexp.runstore import resolve_run_id
    from fungiexp.validate import validate_config

    current = compose_config(overrides)
    uri, _ = tracking.setup_tracking(current.tracking)
    run_id = resolve_run_id(uri, run_id)
    client = MlflowClient()
    try:
        original = client.get_run(run_id)
    except MlflowException as error:
        raise ConfigError("run id", f"run {run_id!r} not found in {mlflow.get_tracking_uri()}.") from error
    _require_test_metrics(original, client)

    folder = Path(str(current.dataset.cache_dir or ".cache/fungiexp")) / "reproduce" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    cfg = with_defaults(OmegaConf.load(client.download_artifacts(run_id, "config/resolved.yaml", str(folder))))
    # A run of `fungiexp evaluate` logs the config with its evaluation keys but
    # not the split, which is the split of the run whose model it scored.
    trained_id = original.data.tags.get(EVALUATES_TAG, run_id)
    if trained_id != run_id:
        print(
            f"Run {run_id} scored the model of run {trained_id} again (fungiexp evaluate), "
            f"so this trains {trained_id}'s config with the evaluation settings of {run_id}."
        )
    try:
        manifest = client.download_artifacts(trained_id, "data/split.csv", str(folder))
    except MlflowException as error:
        raise ConfigError(
            "run id",
            f"run {trained_id} has no data/split.csv artifact, so its split cannot be rebuilt. "
            "Reproduce a run that fungiexp train logged.",
        ) from error
    cfg.tracking = current.tracking
    cfg.dataset.split.manifest = str(Path(manifest).resolve())
    cfg.trainer.resume = None
    cfg.tracking.run_name = f"reproduce {original.info.run_name or run_id}"[:250]
    logged = cfg
    cfg = merge_overrides(cfg, [item for item in overrides if not item.lstrip("+").startswith(("tracking.", "hydra."))])
    validate_config(cfg)

    data = prepare_data(cfg.dataset)
    differences = describe_differences(original.data.tags, tracking.provenance_tags(), data.content_fingerprint())
    changed = changed_by_overrides(logged, cfg, overrides)
    differences += [f"{key}: {then} then, {now} now (override)" for key, (then, now) in changed.items()]
    print(f"Reproducing run {run_id}. What differs from the original run:")
    print("\n".join(f"  {line}" for line in differences) if differences else "  nothing that fungiexp records")
    if original.data.params.get("trainer.deterministic") != "True":
        print(
            "  the original run had trainer.deterministic=false, so exact equality is not expected; "
            "--tolerance sets the accepted difference per metric"
        )

    from fungiexp.compare import REPRODUCE_CHANGED_TAG
    from fungiexp.train import train

    tags = {"fungiexp.reproduces": run_id}
    # Where the data, caches and checkpoints lie does not change the model.
    changed_keys = [key for key in changed if not key.startswith(LOCATION_KEYS)]
    if changed_keys:
        # compare --aggregate then counts the new run as a model of its own, not as a rerun of the original.
        tags[REPRODUCE_CHANGED_TAG] = ",".join(changed_keys)
        # The overrides in the name distinguish two reruns of one run in the MLflow UI.
        suffix = " ".join(item.lstrip("+") for item in overrides if item.split("=", 1)[0].lstrip("+~") in changed_keys)
        cfg.tracking.run_name = f"{cfg.tracking.run_name} {suffix}"[:250]
        print(
            f"  the overrides change the model ({', '.join(changed_keys)}), so the metrics below are not expected to "
            "match; the comparison shows how far they moved"
        )
    result = train(cfg, tags=tags)
    reported = {
        "metrics": {name: value for name, value in original.data.metrics.items() if name.startswith("test/")},
        "maximum": {},
        "tolerances": {},
    }
    rows = compare_metrics(OmegaConf.create(reported), _run_metrics(result), tolerance)
    # A changed model is a new experiment: the table shows how far it moved, and nothing passes or fails.
    return _report(rows, result, f"run {run_id}", changed_keys)


def _require_test_metrics(run, client) -> None:
    """Raise ConfigError unless ``run`` logged test metrics that a rerun can be compared with."""
    from fungiexp.runstore import reject_sweep_parent, unfinished_run_fix

    reject_sweep_parent(run, "metrics", client)
    if any(name.startswith("test/") for name in run.data.metrics):
        return
    fix = unfinished_run_fix(run)
    raise ConfigError(
        "run id",
        f"run {run.info.run_id} has no test metrics to compare with (status {run.info.status}): it did not finish. {fix}",
    )


def changed_by_overrides(logged: DictConfig, merged: DictConfig, overrides: list[str]) -> dict[str, tuple]:
    """Return the keys whose logged value the command-line ``overrides`` changed, each with its (logged, new) value."""
    changed = {}
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith(("tracking.", "hydra.")):
            continue
        then = OmegaConf.select(logged, key, default=None)
        now = OmegaConf.select(merged, key, default=None)
        if then != now:
            changed[key] = (_plain(then), _plain(now))
    return changed


def _plain(value):
    """Return ``value`` as a plain Python object, for printing a config node."""
    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def describe_differences(original_tags: dict, current_tags: dict, content_fingerprint: str) -> list[str]:
    """List what differs between the original run's provenance tags and now."""
    lines = []
    for key, label in (("fungiexp.git.commit", "git commit"), ("fungiexp.git.dirty", "uncommitted changes")):
        if original_tags.get(key) != current_tags.get(key):
            lines.append(f"{label}: {original_tags.get(key)} then, {current_tags.get(key)} now")
    for key in sorted(current_tags):
        if key.startswith("fungiexp.version.") and original_tags.get(key) != current_tags[key]:
            lines.append(f"{key[len('fungiexp.version.'):]}: {original_tags.get(key)} then, {current_tags[key]} now")
    for key, label in (("fungiexp.machine", "machine"), ("fungiexp.platform", "platform")):
        if original_tags.get(key) != current_tags.get(key):
            lines.append(f"{label}: {original_tags.get(key)} then, {current_tags.get(key)} now")
    logged = original_tags.get("fungiexp.data.content_sha256")
    if logged != content_fingerprint:
        lines.append(f"data fingerprint (image contents): {logged} then, {content_fingerprint} now")
    return lines


def compare_metrics(reported: DictConfig, reproduced: dict[str, float], tolerance: float) -> list[dict]:
    """Compare reproduced metrics with reported values and upper bounds.

    Returns:
        One row per metric: ``metric``, ``reported`` (text), ``reproduced``,
        ``difference`` and ``passed``. A metric missing from ``reproduced``
        fails.
    """
    rows = []
    tolerances = dict(reported.get("tolerances") or {})
    for name, value in (reported.get("metrics") or {}).items():
        got = reproduced.get(name, math.nan)
        limit = float(tolerances.get(name, tolerance))
        difference = got - float(value)
        rows.append(
            {"metric": name, "reported": f"{float(value):.4f}", "reproduced": got, "difference": difference, "passed": abs(difference) <= limit + 1e-12}
        )
    for name, bound in (reported.get("maximum") or {}).items():
        got = reproduced.get(name, math.nan)
        rows.append(
            {"metric": name, "reported": f"<= {float(bound):.4f}", "reproduced": got, "difference": got - float(bound), "passed": got <= float(bound)}
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """Format comparison rows as a fixed-width text table."""
    width = max([len("metric")] + [len(row["metric"]) for row in rows])
    lines = [f"{'metric':<{width}}  {'expected':>10}  {'reproduced':>10}  {'difference':>10}  within tolerance"]
    for row in rows:
        lines.append(
            f"{row['metric']:<{width}}  {row['reported']:>10}  {row['reproduced']:>10.4f}  {round(row['difference'], 4) + 0.0:>+10.4f}  "
            f"{'yes' if row['passed'] else 'NO'}"
        )
    return "\n".join(lines)


def _run_metrics(result: dict) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient(tracking_uri=result["tracking_uri"]).get_run(result["run_id"]).data.metrics)


def _report(rows: list[dict], result: dict, against: str, changed_keys: list[str] | None = None) -> int:
    """Log and print the comparison; return 1 when a metric is outside its tolerance.

    With ``changed_keys`` (overrides that change the model), the comparison
    is printed and logged but not judged: the run is tagged
    ``fungiexp.reproduce.passed=not_judged`` and the status is 0.
    """
    from mlflow.tracking import MlflowClient

    table = format_table(rows)
    passed = all(row["passed"] for row in rows)
    failed = [row["metric"] for row in rows if not row["passed"]]
    if changed_keys:
        moved = f"{len(failed)} of {len(rows)} metrics moved beyond the tolerance" if failed else "no metric moved beyond the tolerance"
        conclusion = f"Not judged: the overrides change the model ({', '.join(changed_keys)}); {moved}."
    else:
        conclusion = "All metrics within tolerance." if passed else f"Outside tolerance: {', '.join(failed)}"
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    client.log_text(result["run_id"], f"Comparison with {against}\n{table}\n{conclusion}\n", "reproduce/comparison.txt")
    client.log_text(result["run_id"], json.dumps(rows, indent=2), "reproduce/comparison.json")
    verdict = "not_judged" if changed_keys else str(passed).lower()
    client.set_tag(result["run_id"], "fungiexp.reproduce.passed", verdict)
    print(f"\nComparison with {against}, MLflow run {result['run_id']}:")
    print(table)
    print(conclusion)
    return 0 if passed or changed_keys else 1
