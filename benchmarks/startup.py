"""Benchmark 5: latency of the commands that do not train.

Times three commands as a user's shell runs them, each in a new process:
``fungiexp --help``, ``fungiexp compare`` on a store of a few runs, and
``fungiexp data check`` on a folder whose check is cached. It also checks
that none of them imports TensorFlow. The target is under two seconds
each. Usage:

    python benchmarks/startup.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import REPO_ROOT, figure, scratch_folder, timed

COMMAND = str(Path(sys.executable).with_name("fungiexp"))
TARGET_SECONDS = 2.0


def imports_tensorflow(args: list[str], cwd: str) -> bool:
    """Run ``fungiexp ARGS`` in a new interpreter and report whether it imported TensorFlow."""
    code = (
        "import sys, contextlib, io\n"
        "from fungiexp.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main({args!r})\n"
        "print('tensorflow' in sys.modules)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=False).stdout
    return output.strip().splitlines()[-1:] == ["True"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 5")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per command")
    options = parser.parse_args()
    repeats = options.repeats or (3 if options.quick else 5)

    from conftest import write_synthetic_dataset
    from mlflow.tracking import MlflowClient

    with scratch_folder() as folder:
        root = write_synthetic_dataset(Path(folder) / "defungi")
        uri = f"sqlite:///{folder}/mlflow.db"
        client = MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment("startup", artifact_location=f"{folder}/artifacts")
        for index in range(6):
            run = client.create_run(experiment, run_name=f"augmentation={('none', 'strong')[index % 2]}")
            client.log_param(run.info.run_id, "augmentation.name", ("none", "strong")[index % 2])
            client.log_metric(run.info.run_id, "test/macro_f1", 0.5 + index / 100)
            client.log_metric(run.info.run_id, "test/accuracy", 0.6 + index / 100)
            client.set_terminated(run.info.run_id)

        check = ["data", "check", f"dataset.root={root}", "dataset.expected_images=null", f"dataset.cache_dir={folder}/cache"]
        check += [f"dataset.class_info.{code}.expected_images=null" for code in ("H1", "H2", "H3", "H5", "H6")]
        commands = {
            "fungiexp --help": ["--help"],
            "fungiexp compare": ["compare", "--experiment", "startup", "--tracking-uri", uri],
            "fungiexp data check (unchanged folder)": check,
        }
        subprocess.run([COMMAND, *check], cwd=folder, capture_output=True, check=False)  # fills the check's cache
        medians = {}
        for name, args in commands.items():
            values = []
            for _ in range(repeats):
                completed = {}
                values.append(timed(lambda: completed.update(result=subprocess.run([COMMAND, *args], cwd=folder, capture_output=True, text=True, check=False))))
                if completed["result"].returncode != 0:
                    print(f"{name} failed: {completed['result'].stderr.strip()[-500:]}")
            medians[name] = figure(name, values, "s")
            print(f"{name} imports TensorFlow: {'yes' if imports_tensorflow(args, folder) else 'no'}")
    slowest = max(medians.values())
    print(f"slowest command: {slowest:.2f} s against a target of {TARGET_SECONDS:.1f} s")
    print(f"ratio slowest / target: {slowest / TARGET_SECONDS:.2f}x")


if __name__ == "__main__":
    main()
