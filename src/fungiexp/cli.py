"""The `fungiexp` command: a subcommand name, then that subcommand's arguments."""

from __future__ import annotations

import atexit
import os
import re
import sys

USAGE = """\
usage: fungiexp COMMAND [ARGS...]

Commands:
  compare  List runs of an experiment or sweep with the parameters that differ and their metrics.
  data     Fetch the data set (`data fetch`) or check it for bad files (`data check`).
  evaluate Score a logged run's model again with other evaluation.* settings, without training.
  predict  Classify new images with the model of a logged run (`predict RUN_ID PATH...`).
  reproduce
           Rerun experiments/NAME.yaml or a logged run id and compare its metrics.
  train    Train and evaluate one run (or a sweep with -m), logged to MLflow.
  ui       Open the MLflow UI on the project's store (127.0.0.1:5000 by default).

For `train`, ARGS are Hydra overrides and flags, for example:
  fungiexp train model=vgg16 fine_tune=block5 optimizer.lr=1e-4
  fungiexp train --cfg job        (print the composed config)
  fungiexp train -m augmentation=none,strong
`fungiexp train --help` lists the config groups and options.

Run `fungiexp COMMAND --help` for the options of a command.
"""


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand named in ``argv`` (default: ``sys.argv[1:]``) and return its exit status."""
    try:
        return _dispatch(argv)
    except BrokenPipeError:
        # The reader of the output (head, less) closed it early, so stop quietly.
        # Pointing stdout at /dev/null keeps Python's own flush at exit from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


# Hydra's flags that take a value as the next argument (--cfg job, --package _global_).
_VALUE_FLAGS = {"-c", "--cfg", "-p", "--package"}


def _without_flag_values(args: list[str]) -> list[str]:
    """Return ``args`` without the values of Hydra's flags, so that ``job`` in ``--cfg job`` is not read as an override."""
    return [arg for index, arg in enumerate(args) if index == 0 or args[index - 1] not in _VALUE_FLAGS]


def _quote_resume_id(arg: str) -> str:
    """Return a ``trainer.resume=ID`` override with ID quoted, so that Hydra reads it as a string.

    Hydra would read an id prefix such as ``736359e9`` as the number 7.36359e14.
    """
    match = re.fullmatch(r"([+~]*trainer\.resume=)([0-9A-Za-z]+)", arg)
    if match is None or match.group(2) == "null":
        return arg
    return f"{match.group(1)}'{match.group(2)}'"


def _names_resume(args: list[str]) -> bool:
    """Return whether ``args`` set ``trainer.resume``."""
    return any(arg.lstrip("+~").startswith("trainer.resume=") for arg in args)


def _dispatch(argv: list[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0

    command, rest = args[0], args[1:]
    # Hides part of TensorFlow's C++ INFO and WARNING output; lines printed
    # before absl logging starts still appear (TensorFlow 2.21). A value set by the user wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # MLflow's download progress bars fill the output of evaluate, predict and reproduce.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if command == "train":
        from fungiexp.validate import check_overrides

        rest = [_quote_resume_id(arg) for arg in rest]

        multirun = bool({"-m", "--multirun"} & set(rest))
        problem = check_overrides(rest)
        # Checking the config here, before Hydra starts, keeps a config error to one
        # line without a job folder, and finds a bad job of a sweep before the first job trains.
        flags = set(rest)
        if problem is None and not {"--help", "-h", "--info", "-i", "--hydra-help"} & flags:
            from fungiexp.validate import check_sweep_jobs

            invalid_value = check_sweep_jobs(_without_flag_values(rest))
            if invalid_value and {"-c", "--cfg"} & flags:
                # --cfg only prints the config, so a value that would stop the run is a warning after it.
                atexit.register(print, f"fungiexp train: warning: this config would not run: {invalid_value}", file=sys.stderr)
            else:
                problem = invalid_value
            if problem is None and not multirun and not {"-c", "--cfg"} & flags and _names_resume(rest):
                from fungiexp.resume import check_resume_overrides

                # Before Hydra starts, a run that cannot be resumed gives one line and no job folder.
                problem = check_resume_overrides(_without_flag_values(rest))
        if problem:
            print(f"fungiexp train: error: {problem}", file=sys.stderr)
            return 1
        from fungiexp.app import train_app
        from fungiexp.sweep import end_open_parent_run

        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from fungiexp.errors import FungiexpError

        # In a sweep, Hydra prints a failed job's error with a traceback after
        # the last job. With HYDRA_FULL_ERROR set, Hydra raises it here
        # instead, so it can be printed as one line like a single run's error.
        one_line_sweep_errors = multirun and "HYDRA_FULL_ERROR" not in os.environ
        if one_line_sweep_errors:
            os.environ["HYDRA_FULL_ERROR"] = "1"
        # Hydra parses sys.argv itself, so hand it the arguments after the subcommand.
        sys.argv = ["fungiexp train", *rest]
        try:
            train_app()
        except (FungiexpError, HydraException, OmegaConfBaseException) as error:
            end_open_parent_run("FAILED")
            if not one_line_sweep_errors:
                raise
            # A job's config or data error, or an override that Hydra cannot read or compose.
            failed_job = "a job of the sweep failed: " if isinstance(error, FungiexpError) else ""
            print(f"fungiexp train: error: {failed_job}{error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            end_open_parent_run("KILLED")
            print("fungiexp train: interrupted", file=sys.stderr)
            return 130
        except SystemExit as exit_request:
            # Hydra exits with status 1 after a multirun in which a job failed.
            if exit_request.code not in (0, None):
                end_open_parent_run("FAILED")
            raise
        except Exception:
            # With HYDRA_FULL_ERROR=1 Hydra raises the job's error instead of exiting.
            end_open_parent_run("FAILED")
            raise
        return 0

    if command == "data":
        from fungiexp.datacli import data_main

        return data_main(rest)

    if command == "compare":
        from fungiexp.compare import compare_main

        return compare_main(rest)

    if command == "ui":
        from fungiexp.compare import ui_main

        return ui_main(rest)

    if command == "predict":
        from fungiexp.predict import predict_main

        return predict_main(rest)

    if command == "reproduce":
        from fungiexp.reproduce import reproduce_main

        return reproduce_main(rest)

    if command == "evaluate":
        from fungiexp.reevaluate import evaluate_main

        return evaluate_main(rest)

    print(f"fungiexp: unknown command {command!r}; valid commands: compare, data, evaluate, predict, reproduce, train, ui.\n", file=sys.stderr)
    print(USAGE, end="", file=sys.stderr)
    return 2

