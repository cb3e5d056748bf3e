"""Structured config schemas: every key of every config group, with its type.

Merging a composed config into these dataclasses rejects unknown keys (a
misspelt ``trainer.epoch``) and values of the wrong type before any data is
read. Groups whose options differ in keys (``model``, ``optimizer``) list the
union of their options' keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class ClassInfoSchema:
    folder: str = "???"
    species: str = ""
    expected_images: Optional[int] = None


@dataclass
class SplitSchema:
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    group_by: str = "source_image"
    group_pattern: str = "???"
    seed: int = 42
    folds: Optional[int] = None
    fold: int = 0
    manifest: Optional[str] = None


@dataclass
class DatasetSchema:
    name: str = "???"
    root: str = "???"
    source: Optional[str] = None
    sha256: Optional[str] = None
    expected_images: Optional[int] = None
    on_bad_image: str = "error"
    cache_dir: Optional[str] = None
    classes: List[str] = field(default_factory=list)
    class_info: Dict[str, ClassInfoSchema] = field(default_factory=dict)
    label_pattern: str = "???"
    image_size: List[int] = field(default_factory=lambda: [128, 128])
    limit_per_class: Optional[int] = None
    split: SplitSchema = field(default_factory=SplitSchema)


@dataclass
class AugmentationSchema:
    name: str = "none"
    rotation_degrees: float = 0.0
    width_shift: float = 0.0
    height_shift: float = 0.0
    zoom: float = 0.0
    horizontal_flip: bool = False
    vertical_flip: bool = False
    rot90: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    fill_mode: str = "reflect"


@dataclass
class HeadSchema:
    type: str = "flatten"
    dense_units: int = 0
    dropout: float = 0.0


@dataclass
class ModelSchema:
    name: str = "???"
    weights: Optional[str] = None
    preprocessing: str = "auto"
    head: HeadSchema = field(default_factory=HeadSchema)
    # small_cnn only.
    blocks: Optional[List[List[int]]] = None
    kernel_size: int = 3
    activation: str = "relu"
    batch_norm: bool = False
    stem_stride: int = 1


@dataclass
class OptimizerSchema:
    name: str = "???"
    lr: float = 1e-4
    weight_decay: Optional[float] = None
    schedule: str = "constant"
    warmup_epochs: int = 0
    min_lr_fraction: float = 0.0
    # adam and adamw.
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    # sgd only.
    momentum: float = 0.0
    nesterov: bool = False


@dataclass
class FineTuneSchema:
    name: str = "???"
    trainable_from: Optional[str] = None
    frozen: bool = False


@dataclass
class EarlyStoppingSchema:
    enabled: bool = True
    patience: int = 5
    min_delta: float = 0.0


@dataclass
class ThreadsSchema:
    intra_op: int = 0
    inter_op: int = 0


@dataclass
class FeatureCacheSchema:
    enabled: bool = True
    memory_mb: int = 4096
    dtype: str = "float32"
    persist: bool = True
    dir: str = ".cache/fungiexp/features"


@dataclass
class ImageCacheSchema:
    memory_mb: int = 4096
    dir: str = ".cache/fungiexp/images"


@dataclass
class TrainerSchema:
    epochs: int = 15
    batch_size: int = 32
    seed: int = 42
    deterministic: bool = False
    class_weight: str = "balanced"
    objective: str = "macro_f1"
    monitor: str = "val_loss"
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    precision: str = "float32"
    early_stopping: EarlyStoppingSchema = field(default_factory=EarlyStoppingSchema)
    restore_best: bool = True
    strategy: str = "default"
    logical_cpus: int = 0
    jit_compile: Any = "auto"
    threads: ThreadsSchema = field(default_factory=ThreadsSchema)
    image_cache: ImageCacheSchema = field(default_factory=ImageCacheSchema)
    feature_cache: FeatureCacheSchema = field(default_factory=FeatureCacheSchema)
    checkpoint_dir: str = "checkpoints"
    resume: Optional[str] = None
    verbose: int = 2


@dataclass
class BootstrapSchema:
    resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95


@dataclass
class ClassOffsetsSchema:
    tune: bool = False
    max_abs: float = 1.5
    steps: int = 31
    rounds: int = 3


@dataclass
class EvaluationSchema:
    tta: bool = False
    tta_views: str = "flips"
    bootstrap: BootstrapSchema = field(default_factory=BootstrapSchema)
    class_offsets: ClassOffsetsSchema = field(default_factory=ClassOffsetsSchema)


@dataclass
class FiguresSchema:
    gradcam: bool = True
    gradcam_per_class: int = 4
    augmentation_preview: bool = True
    error_gallery: bool = True


@dataclass
class TrackingSchema:
    uri: str = "???"
    artifact_root: Optional[str] = None
    experiment: str = "???"
    run_name: Optional[str] = None
    log_model: bool = True
    register_as: Optional[str] = None
    figures: FiguresSchema = field(default_factory=FiguresSchema)


@dataclass
class ReportedSchema:
    source: str = ""
    tolerance: float = 0.02
    tolerances: Dict[str, float] = field(default_factory=dict)
    metrics: Dict[str, float] = field(default_factory=dict)
    maximum: Dict[str, float] = field(default_factory=dict)
    requires: List[str] = field(default_factory=list)
    notes: str = ""
    seeds: List[int] = field(default_factory=list)
    mean: Dict[str, float] = field(default_factory=dict)
    std: Dict[str, float] = field(default_factory=dict)


@dataclass
class RunSchema:
    dataset: DatasetSchema = field(default_factory=DatasetSchema)
    augmentation: AugmentationSchema = field(default_factory=AugmentationSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    fine_tune: FineTuneSchema = field(default_factory=FineTuneSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    evaluation: EvaluationSchema = field(default_factory=EvaluationSchema)
    tracking: TrackingSchema = field(default_factory=TrackingSchema)
    # Set by experiment files: the numbers a run should reproduce.
    reported: Optional[ReportedSchema] = None


def with_defaults(cfg):
    """Return ``cfg`` with each schema key that ``cfg`` lacks set to its default.

    A config logged by an earlier version of fungiexp lacks the keys added
    since. Resuming or reproducing that run fills them with the defaults,
    which match the YAML files and leave the newer features off. Keys that
    ``cfg`` has are kept, and unknown keys still fail validation later.
    """
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.structured(RunSchema), resolve=False)
    defaults.pop("reported", None)
    return OmegaConf.merge(OmegaConf.create(defaults), cfg)
