"""Check a composed config before any data is read or model is built.

Every check here is cheap and imports no TensorFlow, so a typo fails in the
first second of a run instead of after an hour of training. Messages name the
dotted key, the value received and the valid choices or range.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
import urllib.parse
import urllib.request
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fungiexp.errors import ConfigError
from fungiexp.schema import RunSchema

MODELS = ("vgg16", "small_cnn", "small_cnn_bn")
PREPROCESSING = ("auto", "vgg16", "rescale")
HEADS = ("flatten", "gap")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
MONITORS = ("val_loss", "val_accuracy", "val_macro_f1")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
CLASS_WEIGHTS = ("balanced", "none")
GROUP_LEVELS = ("source_image", "sample", "none")
BAD_IMAGE_POLICIES = ("error", "skip")
FILL_MODES = ("reflect", "wrap", "nearest", "constant")

# The keys that take one of a fixed set of values, with those values.
CHOICES = {
    "dataset.on_bad_image": BAD_IMAGE_POLICIES,
    "dataset.split.group_by": GROUP_LEVELS,
    "augmentation.fill_mode": FILL_MODES,
    "model.name": MODELS,
    "model.preprocessing": PREPROCESSING,
    "model.head.type": HEADS,
    "optimizer.name": OPTIMIZERS,
    "optimizer.schedule": SCHEDULES,
    "trainer.monitor": MONITORS,
    "trainer.objective": ("macro_f1", "accuracy"),
    "trainer.strategy": ("default", "mirrored"),
    "trainer.class_weight": CLASS_WEIGHTS,
    "trainer.jit_compile": ("auto", True, False),
    "trainer.precision": PRECISIONS,
    "trainer.feature_cache.dtype": ("float32", "float16"),
    "evaluation.tta_views": ("flips", "dihedral"),
}

# Layer names of keras.applications.VGG16 without its top, in order.
VGG16_LAYERS = tuple(
    f"block{block}_{kind}"
    for block, convs in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for kind in [f"conv{index}" for index in range(1, convs + 1)] + ["pool"]
)
# VGG16 applies five 2x2 max-pools, so smaller inputs leave no pixels.
VGG16_MIN_SIZE = 32


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid key or value of ``cfg``.

    Checks, in order: unknown keys and wrong types (against ``schema.RunSchema``),
    then the values of each group, then the combinations of groups.
    """
    _check_schema(cfg)
    _check_dataset(cfg.dataset)
    check_augmentation(cfg.augmentation, cfg.dataset.image_size)
    check_model(cfg.model, cfg.fine_tune, cfg.dataset.image_size)
    _check_optimizer(cfg.optimizer)
    _check_trainer(cfg.trainer)
    _check_evaluation(cfg.evaluation, cfg.dataset.image_size)


def validate_evaluation(cfg: DictConfig) -> None:
    """Raise ConfigError for an unknown key, a wrong type or an invalid value under ``evaluation`` of ``cfg``.

    A part of validate_config that needs no data folder and no other group's
    values except the image size.
    """
    _check_schema(cfg)
    _check_evaluation(cfg.evaluation, cfg.dataset.image_size)


def _check_schema(cfg: DictConfig) -> None:
    schema = OmegaConf.structured(RunSchema)
    try:
        OmegaConf.merge(schema, cfg)
    except ConfigKeyError as error:
        key = error.full_key or "config"
        parent, _, name = key.rpartition(".")
        known = list(OmegaConf.select(schema, parent).keys()) if parent else list(schema.keys())
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"Did you mean {parent + '.' if parent else ''}{close[0]}?" if close else f"Valid keys: {', '.join(known)}."
        raise ConfigError(key, f"unknown key. {hint}") from None
    except OmegaConfBaseException as error:
        key = error.full_key or "config"
        value = OmegaConf.select(cfg, key, default=None) if error.full_key else None
        if "ListConfig" in str(error.msg):
            # OmegaConf's own words here ("AnyNode is not a ListConfig") name its internals, not the fix.
            if isinstance(value, (list, ListConfig)):
                expected = f"one of {', '.join(map(str, CHOICES[key]))}" if key in CHOICES else f"one value, {_expected_type(key)}"
                raise ConfigError(key, f"invalid value {list(value)!r}: expected {expected}, not a list.") from None
            raise ConfigError(key, f"invalid value {value!r}: expected a list, for example [128, 128].") from None
        first_line = str(error.msg).splitlines()[0] if getattr(error, "msg", None) else str(error)
        raise ConfigError(key, f"invalid value {value!r}: expected {_expected_type(key)} ({first_line}).") from None
    _check_booleans(OmegaConf.to_container(cfg, resolve=False), "")


def _check_booleans(node, prefix: str) -> None:
    """Raise ConfigError for a boolean key of the schema whose value is not true or false.

    OmegaConf accepts no, off or 2 for a boolean when merging, but the config
    a run uses keeps the string or number, which Python treats as true.
    """
    if not isinstance(node, dict):
        return
    for name, value in node.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            _check_booleans(value, f"{key}.")
        elif _schema_field(key) is bool and not isinstance(value, bool) and value is not None:
            raise ConfigError(key, f"invalid value {value!r}: expected true or false.")


def _schema_field(key: str):
    """Return the type annotation of the schema field at dotted ``key``, or None if there is no such field."""
    return _field_at(RunSchema, key.split("."))


def _field_at(node, parts: list[str]):
    """Return the type of the field at ``parts`` below the dataclass ``node``, or None if unknown.

    Keys of a dict field (class codes, metric names) are free, so the part
    after a dict's name is skipped and the walk goes on in the dict's value type.
    """
    if not parts:
        return node
    if not dataclasses.is_dataclass(node):
        return None
    annotations = typing.get_type_hints(node)
    if parts[0] not in annotations:
        return None
    annotation = annotations[parts[0]]
    # Optional[X] is Union[X, None].
    arguments = [argument for argument in typing.get_args(annotation) if argument is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(arguments) == 1:
        annotation = arguments[0]
    if typing.get_origin(annotation) in (dict, typing.Dict) and len(parts) > 1:
        value_type = typing.get_args(annotation)[1]
        if dataclasses.is_dataclass(value_type):
            return _field_at(value_type, parts[2:])
        # A plain value (a number, a string) has no fields below it.
        return value_type if len(parts) == 2 else None
    return _field_at(annotation, parts[1:])


def _expected_type(key: str) -> str:
    item = re.fullmatch(r"(.+)\[\d+\]", key)
    annotation = _schema_field(item.group(1) if item else key)
    if item and typing.get_origin(annotation) in (list, typing.List):
        # An item of a list key (dataset.image_size[1]) has the list's item type.
        annotation = typing.get_args(annotation)[0]
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, "another type")


# Config groups that a run has only when an override adds them (+experiment=NAME).
OPTIONAL_GROUPS = ("experiment", "search")


def unknown_override_key(key: str) -> str | None:
    """Return an error message if the dotted config ``key`` of a command-line override does not exist, else None.

    Hydra rejects such an override with its own message, which suggests
    adding the key with ``+``. This check names the first part of the key
    that does not exist and the closest existing key instead.
    """
    parts = key.split(".")
    for index in range(1, len(parts) + 1):
        prefix = ".".join(parts[:index])
        if _schema_field(prefix) is not None:
            continue
        parent = ".".join(parts[: index - 1])
        node = _schema_field(parent) if parent else RunSchema
        if not dataclasses.is_dataclass(node):
            return None
        known = [field.name for field in dataclasses.fields(node)]
        close = difflib.get_close_matches(parts[index - 1], known, n=1)
        hint = f"Did you mean {parent + '.' if parent else ''}{close[0]}?" if close else f"Valid keys: {', '.join(known)}."
        return f"{prefix}: unknown key. {hint}"
    return None


def check_overrides(args: list[str]) -> str | None:
    """Return the error for the first ``KEY=VALUE`` override whose dotted key the config lacks, or None.

    Overrides with ``~`` or ``++``, ``+GROUP=OPTION``, flags and Hydra's own
    keys are left to Hydra. ``+section.key`` is checked like ``section.key``,
    because the schema rejects keys it does not know anyway. A key without a
    dot must name a config group or section (``model=vgg16``).
    """
    for arg in args:
        key, equals, value = arg.partition("=")
        if key.startswith("+") and not key.startswith("++") and (key[1:] in OPTIONAL_GROUPS or "." in key):
            key = key[1:]
        elif key in OPTIONAL_GROUPS and equals:
            return f"{key}: this config group is not in the defaults list, so add it with a plus: +{arg}"
        if not equals or key.startswith(("+", "~", "-", "hydra.", "hydra/")):
            continue
        problem = unknown_override_key(key) if key not in OPTIONAL_GROUPS else None
        if problem is None and "." not in key:
            problem = unknown_group_option(key, value)
        if problem:
            return problem
    return None


# Characters of Hydra's sweep and interpolation syntax (range(), choice(), glob(), ${...}),
# whose values only Hydra can expand.
_SWEEP_SYNTAX = set("()[]{}$*")


def unknown_group_option(group: str, value: str) -> str | None:
    """Return an error message if ``value`` names no option of the config group ``group``, else None.

    ``value`` may list several options for a sweep (``model=vgg16,small_cnn``).
    Hydra rejects an unknown option too, but its message lists the config
    search path and an environment variable. This one names the closest
    option instead. Values in Hydra's sweep syntax are left to Hydra.
    """
    from fungiexp.app import config_dir

    folder = config_dir() / group
    if not folder.is_dir() or _SWEEP_SYNTAX & set(value) or value == "null":
        return None
    options = sorted(path.stem for path in folder.glob("*.yaml"))
    for option in (part.strip() for part in value.split(",")):
        if option in options:
            continue
        close = difflib.get_close_matches(option, options, n=1)
        hint = f"Did you mean {close[0]}? " if close else ""
        return f"{group}={option}: no such option ({_shown(folder / (option + '.yaml'))} does not exist). {hint}Options: {', '.join(options)}."
    return None


def merge_overrides(cfg: DictConfig, items: list[str]) -> DictConfig:
    """Return ``cfg`` with the ``KEY=VALUE`` overrides ``items`` applied, their values read as `fungiexp train` reads them.

    Hydra's override grammar gives true, false, numbers, lists and null their
    types and keeps yes, no, on and off as strings, which validation then
    rejects for a true/false key. OmegaConf's own dot-list parser would read
    them as booleans.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    merged = cfg.copy()
    parser = OverridesParser.create()
    for item in items:
        try:
            (override,) = parser.parse_overrides([item])
        except OverrideParseException as error:
            raise ConfigError(item, f"cannot read this override: {str(error).splitlines()[0]}.") from None
        if override.is_sweep_override() or override.is_delete():
            raise ConfigError(item, "takes one KEY=VALUE setting here, not a sweep or a deletion.")
        OmegaConf.update(merged, override.key_or_group, override.value(), merge=True)
    return merged


# Most jobs of a sweep whose configs are checked before the first job starts.
SWEEP_CHECK_LIMIT = 100


def check_sweep_jobs(args: list[str]) -> str | None:
    """Return the error of the first job of the sweep ``args`` whose config is invalid, or None.

    Hydra composes each job's config only when the job starts, so a bad value
    in the third job would otherwise show after two whole trainings. The
    jobs' configs are composed and validated here first. Sweeps that cannot
    be listed in advance (interval() and glob() values, as sweeper plugins
    use) or that have more than SWEEP_CHECK_LIMIT jobs are left to the jobs
    themselves, and so are overrides Hydra cannot compose.
    """
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from fungiexp.datacli import compose_config

    items = [arg for arg in args if not arg.startswith("-") and not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        parsed = OverridesParser.create().parse_overrides(items)
        choices = [
            [f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()]
            if override.is_sweep_override()
            else [item]
            for override, item in zip(parsed, items)
        ]
    except HydraException:
        return None
    if math.prod(len(options) for options in choices) > SWEEP_CHECK_LIMIT:
        return None
    for job in itertools.product(*choices):
        try:
            cfg = compose_config(list(job))
        except (HydraException, OmegaConfBaseException):
            return None
        try:
            validate_config(cfg)
        except ConfigError as error:
            swept = " ".join(override for override, options in zip(job, choices) if len(options) > 1)
            return f"the job with {swept}: {error}" if swept else str(error)
    return None


def _shown(path: Path) -> str:
    """Return ``path`` relative to the working directory where it lies below it, else as it is."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def choice(key: str, value) -> None:
    """Raise ConfigError unless ``value`` is one of the values that CHOICES lists for ``key``."""
    allowed = CHOICES[key]
    if value not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(map(str, allowed))}; got {value!r}.")


def positive(key: str, value, integer: bool = False) -> None:
    """Raise ConfigError unless ``value`` is above zero."""
    if value is None or value <= 0:
        kind = "a positive integer" if integer else "positive"
        raise ConfigError(key, f"must be {kind}; got {value!r}.")


def _check_dataset(dataset: DictConfig) -> None:
    size = list(dataset.image_size)
    if len(size) != 2 or any(side <= 0 for side in size):
        raise ConfigError("dataset.image_size", f"must be [height, width] in pixels, both positive; got {size}.")
    codes = list(dataset.classes)
    if len(codes) < 2:
        raise ConfigError("dataset.classes", f"needs at least two class codes; got {codes}.")
    unknown = [code for code in codes if code not in dataset.class_info]
    if unknown:
        raise ConfigError(
            "dataset.classes", f"{unknown} not in dataset.class_info; valid codes are {sorted(dataset.class_info)}."
        )
    if len(set(codes)) != len(codes):
        raise ConfigError("dataset.classes", f"lists a class more than once; got {codes}.")
    choice("dataset.on_bad_image", dataset.on_bad_image)
    if dataset.limit_per_class is not None:
        positive("dataset.limit_per_class", dataset.limit_per_class, integer=True)
    for key in ("label_pattern", "split.group_pattern"):
        pattern = OmegaConf.select(dataset, key)
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"dataset.{key}", f"is not a valid regular expression ({error}); got {pattern!r}.") from None

    split = dataset.split
    check_split(split)
    if split.manifest is not None and not Path(split.manifest).is_file():
        raise ConfigError("dataset.split.manifest", f"file {split.manifest} not found; give the split.csv of an earlier run or null.")

    root = Path(dataset.root)
    if not root.exists() and not dataset.source:
        raise ConfigError(
            "dataset.root",
            f"folder {root} does not exist and dataset.source is not set. Set dataset.source to the "
            "DeFungi archive (for example dataset.source=../shared/data/defungi.zip) or dataset.root "
            "to an extracted copy.",
        )
    if root.is_dir():
        _check_class_folders(dataset, root)


def check_split(split: DictConfig) -> None:
    """Raise ConfigError for an invalid grouping level, fractions or fold settings of ``dataset.split``."""
    choice("dataset.split.group_by", split.group_by)
    for key in ("val_fraction", "test_fraction"):
        if not 0.0 < split[key] < 1.0:
            raise ConfigError(f"dataset.split.{key}", f"must be between 0 and 1 (exclusive); got {split[key]}.")
    if split.val_fraction + split.test_fraction >= 1.0:
        raise ConfigError(
            "dataset.split",
            f"val_fraction + test_fraction must be below 1 to leave training images; "
            f"got {split.val_fraction} + {split.test_fraction}.",
        )
    if split.get("folds") is not None:
        if split.folds < 2:
            raise ConfigError("dataset.split.folds", f"must be null (no folds) or at least 2; got {split.folds}.")
        if not 0 <= split.fold < split.folds:
            raise ConfigError("dataset.split.fold", f"must be in 0..{split.folds - 1} for {split.folds} folds; got {split.fold}.")


def _check_class_folders(dataset: DictConfig, root: Path) -> None:
    from fungiexp.images import find_class_root

    folders = {code: str(dataset.class_info[code].folder) for code in dataset.classes}
    class_root = find_class_root(root, list(folders.values()))
    if class_root is None:
        return
    missing = [code for code, folder in folders.items() if not (class_root / folder).is_dir()]
    if missing:
        present = sorted(code for code, folder in folders.items() if code not in missing)
        raise ConfigError(
            "dataset.classes",
            f"classes {missing} have no folder in {class_root}; classes present are {present}. "
            "Remove the missing classes from dataset.classes or restore their folders.",
        )


def check_augmentation(augmentation: DictConfig, image_size) -> None:
    """Raise ConfigError for a negative or too large strength, an unknown fill mode or rot90 on non-square images."""
    for key in ("rotation_degrees", "width_shift", "height_shift", "zoom", "brightness", "contrast"):
        if augmentation[key] < 0:
            raise ConfigError(f"augmentation.{key}", f"must be 0 or positive; got {augmentation[key]}.")
    for key in ("width_shift", "height_shift", "zoom", "brightness", "contrast"):
        if augmentation[key] >= 1:
            raise ConfigError(f"augmentation.{key}", f"must be below 1 (a fraction); got {augmentation[key]}.")
    choice("augmentation.fill_mode", augmentation.fill_mode)
    if augmentation.rot90 and image_size[0] != image_size[1]:
        raise ConfigError(
            "augmentation.rot90",
            f"needs square images; dataset.image_size is {list(image_size)}. Set augmentation.rot90=false or a square size.",
        )


def check_model(model: DictConfig, fine_tune: DictConfig, image_size) -> None:
    """Raise ConfigError for an unknown model, head or preprocessing, missing weights, a too small image or a fine-tune setting the model lacks."""
    choice("model.name", model.name)
    choice("model.preprocessing", model.preprocessing)
    choice("model.head.type", model.head.type)
    if model.head.dense_units < 0:
        raise ConfigError("model.head.dense_units", f"must be 0 (no dense layer) or positive; got {model.head.dense_units}.")
    if not 0.0 <= model.head.dropout < 1.0:
        raise ConfigError("model.head.dropout", f"must be in [0, 1); got {model.head.dropout}.")

    weights = model.weights
    if weights is not None and weights != "imagenet" and not Path(weights).expanduser().is_file():
        raise ConfigError(
            "model.weights", f"weights file {weights} not found. Set model.weights to imagenet, null, or an existing file."
        )

    smallest = min(image_size)
    if model.name == "vgg16":
        if smallest < VGG16_MIN_SIZE:
            raise ConfigError(
                "dataset.image_size",
                f"model=vgg16 needs at least {VGG16_MIN_SIZE}x{VGG16_MIN_SIZE} pixels; got {list(image_size)}.",
            )
        first = fine_tune.trainable_from
        if first is not None and first not in VGG16_LAYERS:
            valid = ", ".join(name for name in VGG16_LAYERS if name.endswith("_conv1"))
            raise ConfigError(
                "fine_tune.trainable_from",
                f"layer {first!r} (fine_tune={fine_tune.name}) does not exist in model=vgg16; valid first layers are {valid}.",
            )
        return

    # small_cnn and small_cnn_bn
    if fine_tune.name != "all" or fine_tune.frozen or fine_tune.trainable_from:
        raise ConfigError(
            "fine_tune",
            f"fine_tune={fine_tune.name} does not apply to model={model.name}, which has no pretrained backbone "
            "to freeze. Use fine_tune=all, or model=vgg16.",
        )
    if weights == "imagenet":
        raise ConfigError("model.weights", f"model={model.name} has no ImageNet weights; set model.weights=null or a weights file.")
    blocks = model.blocks
    if not blocks or any(not block for block in blocks):
        raise ConfigError("model.blocks", f"must be a non-empty list of non-empty lists of filter counts; got {blocks}.")
    stride = model.get("stem_stride", 1)
    if stride not in (1, 2):
        raise ConfigError("model.stem_stride", f"must be 1 or 2; got {stride!r}.")
    downsampling = 2 ** (len(blocks) - 1) * stride
    if smallest < downsampling:
        raise ConfigError(
            "dataset.image_size",
            f"model.blocks pools {len(blocks) - 1} times (and model.stem_stride={stride}), so images need at least {downsampling}x{downsampling} "
            f"pixels; got {list(image_size)}.",
        )


def _check_optimizer(optimizer: DictConfig) -> None:
    choice("optimizer.name", optimizer.name)
    positive("optimizer.lr", optimizer.lr)
    if optimizer.weight_decay is not None and optimizer.weight_decay < 0:
        raise ConfigError("optimizer.weight_decay", f"must be null or 0 or positive; got {optimizer.weight_decay}.")
    if optimizer.name == "adamw" and optimizer.weight_decay is None:
        raise ConfigError("optimizer.weight_decay", "optimizer=adamw needs a weight decay, for example 0.01; or use optimizer=adam.")
    choice("optimizer.schedule", optimizer.schedule)
    if optimizer.warmup_epochs < 0:
        raise ConfigError("optimizer.warmup_epochs", f"must be 0 or a positive integer; got {optimizer.warmup_epochs}.")
    if not 0.0 <= optimizer.min_lr_fraction <= 1.0:
        raise ConfigError("optimizer.min_lr_fraction", f"must be between 0 and 1; got {optimizer.min_lr_fraction}.")


def _check_trainer(trainer: DictConfig) -> None:
    positive("trainer.epochs", trainer.epochs, integer=True)
    positive("trainer.batch_size", trainer.batch_size, integer=True)
    choice("trainer.monitor", trainer.monitor)
    choice("trainer.objective", trainer.objective)
    choice("trainer.strategy", trainer.strategy)
    choice("trainer.class_weight", trainer.class_weight)
    if trainer.early_stopping.enabled:
        positive("trainer.early_stopping.patience", trainer.early_stopping.patience, integer=True)
    choice("trainer.jit_compile", trainer.jit_compile)
    choice("trainer.precision", trainer.precision)
    choice("trainer.feature_cache.dtype", trainer.feature_cache.dtype)
    if trainer.image_cache.memory_mb < 0:
        raise ConfigError("trainer.image_cache.memory_mb", f"must be 0 (always on disk) or positive; got {trainer.image_cache.memory_mb}.")
    if trainer.feature_cache.memory_mb < 0:
        raise ConfigError("trainer.feature_cache.memory_mb", f"must be 0 (always on disk) or positive; got {trainer.feature_cache.memory_mb}.")
    if not 0.0 <= trainer.label_smoothing < 1.0:
        raise ConfigError("trainer.label_smoothing", f"must be at least 0 and below 1 (0.1 is common); got {trainer.label_smoothing}.")
    if not 0.0 <= trainer.ema_decay < 1.0:
        raise ConfigError("trainer.ema_decay", f"must be 0 (no weight average) or below 1, such as 0.998; got {trainer.ema_decay}.")


def _check_evaluation(evaluation: DictConfig, image_size) -> None:
    choice("evaluation.tta_views", evaluation.tta_views)
    if evaluation.tta and evaluation.tta_views == "dihedral" and image_size[0] != image_size[1]:
        raise ConfigError(
            "evaluation.tta_views",
            f"dihedral rotates images by 90 degrees and needs square ones; dataset.image_size is {list(image_size)}. "
            "Set evaluation.tta_views=flips or a square size.",
        )
    bootstrap = evaluation.bootstrap
    if bootstrap.resamples < 0:
        raise ConfigError("evaluation.bootstrap.resamples", f"must be 0 (no intervals) or positive, 1000 or more for stable intervals; got {bootstrap.resamples}.")
    if not 0.0 < bootstrap.confidence < 1.0:
        raise ConfigError("evaluation.bootstrap.confidence", f"must be between 0 and 1, for example 0.95; got {bootstrap.confidence}.")
    offsets = evaluation.class_offsets
    if offsets.max_abs <= 0:
        raise ConfigError("evaluation.class_offsets.max_abs", f"must be positive, for example 1.5; got {offsets.max_abs}.")
    if offsets.steps < 2 or offsets.rounds < 1:
        raise ConfigError(
            "evaluation.class_offsets", f"steps must be 2 or more and rounds 1 or more; got steps={offsets.steps}, rounds={offsets.rounds}."
        )


def check_tracking_store(uri: str) -> None:
    """Raise ConfigError if the MLflow store at ``uri`` cannot be reached or created."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as response:
                response.read()
        except OSError as error:
            raise ConfigError(
                "tracking.uri",
                f"MLflow tracking server {uri} is not reachable ({error}). Start it (`mlflow server "
                "--host 127.0.0.1`) or set tracking=local.",
            ) from None
    elif parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError("tracking.uri", f"cannot create the folder of {path} ({error}); choose a writable path.") from None
