"""`fungiexp data fetch` and `fungiexp data check`: get and inspect the data set without training."""

from __future__ import annotations

import logging
import sys

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig

from fungiexp.errors import FungiexpError

log = logging.getLogger(__name__)

USAGE = """\
usage: fungiexp data {fetch,check} [OVERRIDES...]

  fetch   Download or copy dataset.source and extract it into dataset.root.
          Does nothing when dataset.root already exists.
  check   Scan dataset.root and report images, source images and samples per
          class, then every problem found, grouped by kind (ten files per kind;
          --all lists every file). Exits with status 1 when a problem would stop
          `fungiexp train` under dataset.on_bad_image=error.

OVERRIDES are the same Hydra overrides as for `fungiexp train`, for example:
  fungiexp data fetch dataset.source=../shared/data/defungi.zip
  fungiexp data check dataset.root=data/defungi dataset=defungi_h123
"""


def data_main(args: list[str]) -> int:
    """Run `fungiexp data SUBCOMMAND` and return the exit status."""
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    if any(arg in ("-h", "--help") for arg in args[1:]):
        print(USAGE, end="")
        return 0
    subcommand, overrides = args[0], [arg for arg in args[1:] if arg != "--all"]
    show_all = "--all" in args[1:]
    if subcommand not in ("fetch", "check"):
        print(f"fungiexp data: unknown subcommand {subcommand!r}; valid subcommands: fetch, check.\n", file=sys.stderr)
        print(USAGE, end="", file=sys.stderr)
        return 2
    unknown = [arg for arg in overrides if arg.startswith("-")]
    if unknown:
        print(f"fungiexp data {subcommand}: error: unknown option {unknown[0]!r}; the only option is --all (for check).", file=sys.stderr)
        return 2
    from fungiexp.validate import check_overrides

    problem = check_overrides(overrides)
    if problem:
        print(f"fungiexp data {subcommand}: error: {problem}", file=sys.stderr)
        return 1

    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        cfg = compose_config(overrides)
        if subcommand == "fetch":
            return _fetch(cfg)
        return _check(cfg, show_all)
    except (FungiexpError, HydraException) as error:
        print(f"fungiexp data {subcommand}: error: {error}", file=sys.stderr)
        return 1


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose the project's config with ``overrides``, as `fungiexp train` would."""
    from fungiexp.app import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _fetch(cfg: DictConfig) -> int:
    from fungiexp.fetch import fetch
    from fungiexp.images import scan_images

    if not cfg.dataset.source and not _root_exists(cfg):
        print(
            "fungiexp data fetch: error: dataset.source is not set. Set it to the DeFungi archive, "
            "for example dataset.source=../shared/data/defungi.zip",
            file=sys.stderr,
        )
        return 1
    root = fetch(cfg.dataset)
    records = scan_images(cfg.dataset, root)
    print(f"Data folder {root}: {len(records)} images of classes {', '.join(cfg.dataset.classes)}")
    return 0


def _check(cfg: DictConfig, show_all: bool) -> int:
    from pathlib import Path

    from fungiexp.datacheck import format_report, scan_dataset

    root = Path(cfg.dataset.root)
    if not root.is_dir():
        print(
            f"fungiexp data check: error: dataset.root {root} does not exist. "
            "Run `fungiexp data fetch dataset.source=ARCHIVE` first or set dataset.root.",
            file=sys.stderr,
        )
        return 1
    cache_dir = Path(str(cfg.dataset.cache_dir)) if cfg.dataset.get("cache_dir") else None
    report = scan_dataset(cfg.dataset, root, cache_dir)
    print(format_report(report, limit=None if show_all else 10))
    return 1 if report.blocking else 0


def _root_exists(cfg: DictConfig) -> bool:
    from pathlib import Path

    return Path(cfg.dataset.root).exists()
