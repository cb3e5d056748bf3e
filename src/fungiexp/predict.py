"""`fungiexp predict`: classify new images with the model of a logged run."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np

from fungiexp.errors import ConfigError, FungiexpError

log = logging.getLogger(__name__)

DESCRIPTION = """\
Classify image files or folders with the model that a run logged.

  fungiexp predict RUN_ID PATH... [--group-by source_image|sample] [--output predictions.csv]

Writes one CSV row per image (file, predicted class, species, one probability
per class) and prints a table. With --group-by, patches of one source image
or sample are also summarised by the mean of their probabilities, because a
diagnosis is made per sample, not per patch. Files that cannot be read are
listed with the reason and skipped; the exit status is then 1.
"""


def predict_main(args: list[str]) -> int:
    """Run `fungiexp predict` and return the exit status."""
    parser = argparse.ArgumentParser(prog="fungiexp predict", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_id", help="MLflow run id whose model/model.keras is used")
    parser.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--group-by", choices=("source_image", "sample"), help="also summarise per source image or sample")
    parser.add_argument("--output", default="predictions.csv", help="CSV file for the per-image results; a missing folder is created (default: predictions.csv)")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: tracking.uri of the project's config)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per prediction batch (default: 32)")
    options = parser.parse_intermixed_args(args)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        return run_predict(options)
    except FungiexpError as error:
        print(f"fungiexp predict: error: {error}", file=sys.stderr)
        return 1


def run_predict(options) -> int:
    """Load the run's model and config, classify every image, write the CSV files."""
    from fungiexp.images import class_infos, is_image_name, is_system_file, read_rgb

    from fungiexp.evaluate import TTA_VIEWS, apply_class_offsets, tta_views

    model, cfg, offsets, _ = load_run_model(options.run_id, options.tracking_uri)
    infos = class_infos(cfg.dataset)
    image_size = tuple(int(side) for side in cfg.dataset.image_size)

    files, failures = [], []
    for raw in options.paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p) and not is_system_file(p)))
        elif path.is_file():
            files.append(path)
        else:
            failures.append((str(path), "not found"))

    images, good = [], []
    for path in files:
        try:
            images.append(read_rgb(path, image_size))
            good.append(path)
        except (OSError, ValueError, SyntaxError) as error:
            failures.append((str(path), f"unreadable image: {error}"))

    rows = []
    if good:
        views = tta_views(cfg.get("evaluation", {}))
        if views:
            log.info(
                "Averaging %d views of each image (evaluation.tta_views=%s), as run %s did with evaluation.tta=true",
                len(TTA_VIEWS[views]),
                views,
                options.run_id,
            )
        probabilities = view_mean(model, np.stack(images).astype("float32"), views, options.batch_size)
        if offsets is not None:
            probabilities = apply_class_offsets(probabilities, offsets)
        rows = _prediction_rows(good, probabilities, infos)
        _write_csv(Path(options.output), rows, infos)
        print(_format_rows(rows, infos, "file"))
        print(f"Wrote {len(rows)} predictions to {options.output}")
        if options.group_by:
            group_rows = _group_rows(rows, probabilities, infos, str(cfg.dataset.split.group_pattern), options.group_by)
            group_path = Path(options.output).with_name(f"{Path(options.output).stem}_by_{options.group_by}.csv")
            _write_csv(group_path, group_rows, infos, key=options.group_by)
            print()
            print(_format_rows(group_rows, infos, options.group_by))
            print(f"Wrote {len(group_rows)} {options.group_by} summaries to {group_path}")

    if failures:
        failed = "file failed and was" if len(failures) == 1 else "files failed and were"
        print(f"\n{len(failures)} {failed} skipped:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    if not good:
        print("fungiexp predict: error: no image files found in the given paths.", file=sys.stderr)
        return 1
    return 0


def view_mean(model, images: np.ndarray, views: str | None, batch_size: int = 32) -> np.ndarray:
    """Return the model's class probabilities for ``images`` (batch, height, width, channels).

    With ``views`` (flips or dihedral), the mean over the views that
    evaluation.tta_views names, as a run's evaluation computed them; None
    scores each image once, as it is.
    """
    from fungiexp.evaluate import TTA_VIEWS

    outputs = []
    for transpose, axes in TTA_VIEWS[views] if views else ((False, ()),):
        view = np.swapaxes(images, 1, 2) if transpose else images
        view = np.flip(view, axes) if axes else view
        outputs.append(model.predict(np.ascontiguousarray(view), batch_size=batch_size, verbose=0))
    return np.mean(outputs, axis=0)


def load_run_model(run_id: str, tracking_uri: str | None):
    """Download and load a run's Keras model (safe mode), its resolved config, its class offsets (None if not tuned) and its full id."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from fungiexp.evaluate import OFFSETS_ARTIFACT
    from fungiexp.runstore import reject_sweep_parent, resolve_run_id, unfinished_run_fix
    from fungiexp.tracking import resolve_tracking_uri

    if tracking_uri is None:
        from fungiexp.datacli import compose_config

        tracking_uri = str(compose_config([]).tracking.uri)
    from fungiexp.compare import require_store

    require_store(tracking_uri)
    run_id = resolve_run_id(resolve_tracking_uri(tracking_uri), run_id)
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise ConfigError("run id", f"run {run_id!r} not found in {tracking_uri}; pass --tracking-uri for another store.") from error
    reject_sweep_parent(run, "model", client)
    if run.info.status in ("KILLED", "FAILED"):
        raise ConfigError(
            "run id",
            f"run {run_id} has no logged model (status {run.info.status}): it did not finish. {unfinished_run_fix(run)}",
        )
    if run.info.status == "RUNNING":
        raise ConfigError(
            "run id",
            f"run {run_id} has no logged model yet (status RUNNING): wait until it finishes. A process that was "
            "killed outright (SIGKILL, power loss) also leaves RUNNING; then train the run again.",
        )
    # The downloads are only needed while loading, so they go into a folder that is removed afterwards.
    with tempfile.TemporaryDirectory(prefix="fungiexp-predict-") as folder:
        try:
            model_path = client.download_artifacts(run_id, "model/model.keras", folder)
            config_path = client.download_artifacts(run_id, "config/resolved.yaml", folder)
        except (MlflowException, OSError) as error:
            raise ConfigError(
                "run id",
                f"run {run_id} has no logged model (model/model.keras); it ran with tracking.log_model=false or did not finish.",
            ) from error
        offsets = None
        try:
            offsets_path = client.download_artifacts(run_id, OFFSETS_ARTIFACT, folder)
        except (MlflowException, OSError):
            pass  # the run did not tune class offsets
        else:
            offsets = json.loads(Path(offsets_path).read_text())["offsets"]
            log.info("Applying the class offsets that run %s chose on its validation split: %s", run_id, offsets)
        # TensorFlow loads only here, after the checks above, because importing it takes seconds.
        import keras

        log.info("Loading the model of run %s from %s", run_id, tracking_uri)
        model = keras.saving.load_model(model_path, safe_mode=True)
        config = OmegaConf.load(config_path)
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    return model, config, offsets, run_id


def _prediction_rows(paths, probabilities, infos) -> list[dict]:
    rows = []
    for path, row in zip(paths, probabilities):
        best = int(np.argmax(row))
        rows.append(
            {
                "file": str(path),
                "predicted": infos[best].code,
                "species": infos[best].species,
                **{f"p_{info.code}": float(value) for info, value in zip(infos, row)},
            }
        )
    return rows


def _group_rows(rows, probabilities, infos, pattern: str, level: str) -> list[dict]:
    regex = re.compile(pattern)
    members: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        match = regex.match(Path(row["file"]).stem)
        group = (match.groupdict().get(level) if match else None) or Path(row["file"]).stem
        members.setdefault(group, []).append(index)
    grouped = []
    for group, indices in sorted(members.items()):
        mean = probabilities[indices].mean(axis=0)
        best = int(np.argmax(mean))
        grouped.append(
            {
                level: group,
                "images": len(indices),
                "predicted": infos[best].code,
                "species": infos[best].species,
                **{f"p_{info.code}": float(value) for info, value in zip(infos, mean)},
            }
        )
    return grouped


def _write_csv(path: Path, rows: list[dict], infos, key: str = "file") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        for row in rows:
            writer.writerow({name: f"{value:.6f}" if isinstance(value, float) else value for name, value in row.items()})


def _format_rows(rows: list[dict], infos, key: str, limit: int = 25) -> str:
    """Format up to ``limit`` rows as a table; the CSV file has all of them."""
    shown, rows = rows, rows[:limit]
    width = max(len(key), *(len(str(row[key])) for row in rows))
    header = f"{key:<{width}}  predicted  " + "  ".join(f"{info.code:>6}" for info in infos)
    lines = [header]
    for row in rows:
        probabilities = "  ".join(f"{row[f'p_{info.code}']:6.3f}" for info in infos)
        lines.append(f"{str(row[key]):<{width}}  {row['predicted']:<9}  {probabilities}")
    if len(shown) > limit:
        lines.append(f"... and {len(shown) - limit} more rows in the CSV file")
    return "\n".join(lines)
