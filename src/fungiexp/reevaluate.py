"""`fungiexp evaluate`: score a logged run's model again with other evaluation settings, without training."""

from __future__ import annotations

import argparse
import logging
import sys

from fungiexp.errors import ConfigError, FungiexpError

log = logging.getLogger(__name__)

EVALUATES_TAG = "fungiexp.evaluates"

DESCRIPTION = """\
Score the model that a run logged on its validation and test splits again,
with other evaluation settings (keys under evaluation.*), without training.

  fungiexp evaluate RUN_ID evaluation.class_offsets.tune=true
  fungiexp evaluate RUN_ID evaluation.tta=true evaluation.bootstrap.resamples=2000

dataset.root=FOLDER says where the images are when the command runs in
another folder than the training did.

The new run goes into the same experiment with the original run's config
and parameters, the changed evaluation keys, and the tag
fungiexp.evaluates=RUN_ID. The data must give the same split as the
original run (its split hash is checked). Because only evaluation changes,
`fungiexp train` with the same config and trainer.deterministic=true gives
the same metrics.
"""


def evaluate_main(args: list[str]) -> int:
    """Run `fungiexp evaluate` and return the exit status."""
    parser = argparse.ArgumentParser(prog="fungiexp evaluate", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_id", help="the MLflow run whose model is scored")
    parser.add_argument("overrides", nargs="*", help="evaluation.KEY=VALUE settings, for example evaluation.tta=true")
    parser.add_argument("--tracking-uri", help="MLflow store (default: tracking.uri of the config)")
    if not args:
        # parse_intermixed_args would also report the optional overrides as missing.
        parser.error("the following argument is required: run_id")
    options = parser.parse_intermixed_args(args)
    try:
        return run_evaluate(options)
    except FungiexpError as error:
        print(f"fungiexp evaluate: error: {error}", file=sys.stderr)
        return 1


def run_evaluate(options) -> int:
    """Load the run, apply the evaluation overrides, score the model in a new run and print the summary."""
    from omegaconf import OmegaConf

    for item in options.overrides:
        key = item.split("=", 1)[0].lstrip("+")
        if "=" not in item or not (key.startswith("evaluation.") or key == "dataset.root"):
            raise ConfigError(
                item,
                "evaluate changes only evaluation settings, written as evaluation.KEY=VALUE "
                "(for example evaluation.tta=true), and dataset.root=FOLDER where the images are; "
                "to change anything else, train a new run.",
            )

    from fungiexp.datacli import compose_config
    from fungiexp.validate import merge_overrides, validate_config, validate_evaluation

    # Check the evaluation keys on the default config first: loading the run's model imports TensorFlow, which takes seconds.
    validate_evaluation(merge_overrides(compose_config([]), options.overrides))

    import mlflow
    from mlflow.tracking import MlflowClient

    from fungiexp import tracking
    from fungiexp.data import prepare_data
    from fungiexp.predict import load_run_model
    from fungiexp.schema import with_defaults
    from fungiexp.split import fingerprint
    from fungiexp.summary import format_summary

    model, cfg, _, run_id = load_run_model(options.run_id, options.tracking_uri)
    # Imported after the run checks of load_run_model, which fail fast without TensorFlow.
    from fungiexp.train import evaluate_and_log, logged_history, make_datasets

    cfg = with_defaults(cfg)
    cfg = merge_overrides(cfg, options.overrides)
    validate_config(cfg)

    client = MlflowClient()
    original = client.get_run(run_id)
    named = f" ({original.info.run_name})" if original.info.run_name else ""
    print(f"Scoring the model of run {run_id}{named} again")
    data = prepare_data(cfg.dataset)
    expected = original.data.tags.get("fungiexp.data.split_sha256")
    if expected and fingerprint(data.manifest) != expected:
        raise ConfigError(
            "dataset",
            f"the images in {cfg.dataset.root} give another split than run {run_id} had. "
            "Restore the data the run used (see its data/split.csv artifact).",
        )
    datasets = make_datasets(cfg, data, tuple(int(side) for side in cfg.dataset.image_size))
    # An evaluate run has no curves of its own: plot those of the run that trained the model.
    history = logged_history(original.data.tags.get(EVALUATES_TAG, run_id))

    base = original.info.run_name or run_id[:8]
    # Scoring an evaluate run again keeps one " evaluated" suffix.
    name = base if base.endswith(" evaluated") else f"{base} evaluated"
    # The original parameters (split sizes, parameter counts) with the evaluation keys as now set.
    evaluation = {key: value for key, value in tracking.flatten_config(cfg).items() if key.startswith("evaluation.")}
    params = {**original.data.params, **evaluation}
    with mlflow.start_run(experiment_id=original.info.experiment_id, run_name=name) as run:
        log.info("MLflow run %s evaluates the model of run %s", run.info.run_id, run_id)
        # Not the sweep tags: compare --sweep lists the sweep's training runs only.
        data_tags = {key: value for key, value in original.data.tags.items() if key.startswith("fungiexp.data.")}
        mlflow.set_tags({**tracking.provenance_tags(), **data_tags, EVALUATES_TAG: run_id})
        tracking.log_params(params)
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
        result = evaluate_and_log(cfg, model, data, datasets, history)
    result.update(run_id=run.info.run_id, experiment_id=run.info.experiment_id, tracking_uri=mlflow.get_tracking_uri(), class_infos=data.infos)
    print(format_summary(result))
    return 0
