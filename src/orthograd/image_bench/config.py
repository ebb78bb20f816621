"""The image-classification benchmark's config: data, model, original training, scenario, and the shared ``methods``,
``protocol`` and ``tuning`` sections of every task (``bench.config``).

Method hyperparameters (and every grid value) are checked against the method's own config class when the file is
loaded, so a bad learning rate fails before any model is trained. Each row names a different method (the tables
have a row per method). The hash of the parts that determine the original model (data, model,
training) keys its cache; the hash of the run protocol and a job's identity keys its record (``image_bench.jobs``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from orthograd import methods
from orthograd.bench.config import (
    ConfigError,
    ConfigSection,
    ExperimentConfig,
    MethodRow,
    ProtocolConfig,
    TuningConfig,
    content_hash,
    expand_config,
    validate_as,
)


class DataConfig(ConfigSection):
    """Which dataset, where it lives, and how much of it the benchmark uses.

    ``validation_size`` samples are held out of the training data before anything is trained: the original model
    never sees them, and sweeps select hyperparameters on them (never on test). ``train_size`` / ``test_size``
    subsample the rest (None: all), for CPU-sized runs.
    """

    name: Literal["digits", "fashion_mnist", "cifar10", "imagenet"]
    root: Path | None = None
    train_size: int | None = Field(default=None, ge=1)
    test_size: int | None = Field(default=None, ge=1)
    validation_size: int = Field(default=0, ge=0)
    image_size: int = Field(default=224, ge=8)  # ImageNet only: resize + center crop to this
    verify_checksums: bool = True  # CIFAR-10 only: torchvision's md5 check of the batch files
    split_seed: int = 0

    @model_validator(mode="after")
    def _root_needed(self) -> DataConfig:
        if self.name in ("cifar10", "imagenet") and self.root is None:
            raise ValueError(f"data.root is required for {self.name}: the folder that holds your local copy")
        return self


class SmallCNNConfig(ConfigSection):
    arch: Literal["small_cnn"]
    width: int = Field(default=16, ge=1)
    norm: Literal["group", "batch", "none"] = "group"
    weights: Path | None = None


class ResNet18Config(ConfigSection):
    """ResNet-18 (``orthograd.models.ResNet18``); ``width`` 64 is torchvision's, smaller widths train on CPUs."""

    arch: Literal["resnet18"]
    stem: Literal["cifar", "imagenet"] = "imagenet"  # cifar: 3x3 stride-1 first conv, no max-pool
    width: int = Field(default=64, ge=1)  # channels of the first stage (then 2x, 4x, 8x)
    weights: Path | None = None


class ViTConfig(ConfigSection):
    """torchvision's VisionTransformer; the defaults are ViT-B/16 (smaller sizes for tests and CPUs)."""

    arch: Literal["vit_b_16"]
    patch_size: int = Field(default=16, ge=1)
    num_layers: int = Field(default=12, ge=1)
    num_heads: int = Field(default=12, ge=1)
    hidden_dim: int = Field(default=768, ge=1)
    mlp_dim: int = Field(default=3072, ge=1)
    weights: Path | None = None


ModelConfig = Annotated[SmallCNNConfig | ResNet18Config | ViTConfig, Field(discriminator="arch")]


class TrainConfig(ConfigSection):
    """How the original model (and the retrained reference) is trained; ``epochs: 0`` uses ``model.weights`` as is."""

    epochs: int = Field(ge=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(default=128, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(default=0.9, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 0  # the shuffling of the training data
    # the weights' initialisation (None: the process's generator as it stands, which is how the shipped benchmarks'
    # originals were made; in a fresh ``orthograd bench`` process that is torch's default seed)
    init_seed: int | None = None


class ScenarioConfig(ConfigSection):
    """What is forgotten: ``random`` samples (one split per seed of ``protocol.seeds``) or a whole ``class`` (one
    split per class)."""

    kind: Literal["random", "class"]
    forget_size: int | None = Field(default=None, ge=1)
    retain_size: list[int]
    classes: list[int] = Field(default_factory=list)
    retrain: bool = False

    @field_validator("retain_size", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @model_validator(mode="after")
    def _consistent(self) -> ScenarioConfig:
        if not self.retain_size or min(self.retain_size) < 1:
            raise ValueError("scenario.retain_size must be a positive size or a non-empty list of them")
        if self.kind == "random":
            if self.forget_size is None:
                raise ValueError("scenario.forget_size is required when scenario.kind is 'random'")
            if self.classes:
                raise ValueError("scenario.classes is for kind 'class'; random forgetting uses protocol.seeds")
        else:
            if not self.classes:
                raise ValueError("scenario.classes must list the classes to forget when scenario.kind is 'class'")
            if self.forget_size is not None:
                raise ValueError("scenario.forget_size is for kind 'random'; class forgetting forgets the whole class")
        return self


class ImageProtocol(ProtocolConfig):
    """The run protocol shared by every method: seeds (random forgetting: one split each), the paper's stopping
    rule, the budget and the stop rule's cadence (``bench.protocol``), and what is evaluated."""

    stop: bool = True  # the paper's rule for the scenario (random: A_u <= A_test^p + 0.5; class: A_u < 1%)
    # "stop": rows between the first and the last evaluate only the forget set (what the rule reads), the last row
    # every set; evaluation is ~40-80% of an iterative method's time here (benchmarks/bench_profile.py), at the cost
    # of the retain/test trajectories in trajectories.png
    track: Literal["all", "stop"] = "all"
    privacy: bool = True  # membership-inference metrics of every test run (the MIA columns of the tables)


class ImageTuning(TuningConfig):
    """The gridded rows' tuning: each point scored by UIS on validation splits that share no sample with a test
    split (``image_bench.jobs``); the best point then runs on test. Every method gets the same number of trials and
    one edge extension (``bench.protocol``)."""

    seed: int = 1000  # draws the validation pool and splits (split i: seed + 1 + i, never a test seed)
    retain_size: int | None = Field(default=None, ge=1)  # validation retain size: one of the test ones (None: first)
    classes: list[int] = Field(default_factory=list)  # class forgetting: the validation classes (none: first untested)


class BenchConfig(ExperimentConfig):
    """An image-classification benchmark: data, model, original training, scenario, methods, protocol, tuning."""

    task: Literal["classification"] = "classification"
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    scenario: ScenarioConfig
    methods: Mapping[str, MethodRow]
    protocol: ImageProtocol = Field(default_factory=ImageProtocol)
    tuning: ImageTuning = Field(default_factory=ImageTuning)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: Path | None = None  # trained models (None: the run folder's cache/, so the run folder holds all)

    @model_validator(mode="after")
    def _cross_checks(self) -> BenchConfig:
        named = [row.method for row in self.methods.values()]
        if len(named) != len(set(named)):
            raise ValueError(f"each image row names a different method (the tables have a row per method), got "
                             f"{named}")
        relabelled = [label for label, row in self.methods.items() if label.lower() != row.method]
        if relabelled:
            raise ValueError(f"an image row is labelled by its method (the tables name each row by it), got "
                             f"{relabelled}: write each as `METHOD: {{params: ..., grid: ...}}`")
        for row in self.methods.values():
            methods.make_config(row.method, self.params(row))  # unknown hyperparameter: the method's own error
            for key, values in row.grid.items():
                for value in values:
                    methods.make_config(row.method, {**self.params(row), key: value})
        if self.protocol.track == "stop" and not self.protocol.stop:
            raise ValueError("protocol.track 'stop' evaluates what the stopping rule reads: set protocol.stop true")
        if self.train.epochs == 0 and self.model.weights is None:
            raise ValueError("train.epochs is 0 (use model.weights as the original model) but model.weights is not set")
        tuning = self.tuning
        if self.gridded():
            if self.data.validation_size < 1:
                raise ValueError("a grid is tuned on the validation split: set data.validation_size > 0")
            if tuning.retain_size is not None and tuning.retain_size not in self.scenario.retain_size:
                raise ValueError(f"tuning.retain_size is {tuning.retain_size}, which is not one of "
                                 f"scenario.retain_size {self.scenario.retain_size}")
            if self.scenario.kind == "class":
                if tuning.classes and len(tuning.classes) != tuning.splits:
                    raise ValueError(f"tuning.classes lists {len(tuning.classes)} classes for "
                                     f"{tuning.splits} validation splits (tuning.splits)")
                tested = sorted(set(tuning.classes) & set(self.scenario.classes))
                if tested:
                    raise ValueError(f"tuning.classes {tested} are tested classes: validation never forgets what a "
                                     "test split forgets")
            elif tuning.classes:
                raise ValueError("tuning.classes is for class forgetting; random forgetting draws its validation pool")
        return self

    def model_cache(self) -> Path:
        """Where the original and retrained models are stored: ``cache_dir``, else ``RUN_DIR/cache``."""
        return self.cache_dir if self.cache_dir is not None else self.run_dir() / "cache"

    def original_hash(self) -> str:
        """Hash of what determines the original model: the data, model and training settings."""
        return content_hash({"data": self.data.model_dump(mode="json"), "model": self.model.model_dump(mode="json"),
                             "train": self.train.model_dump(mode="json")})


def validate_config(raw: Mapping[str, Any]) -> BenchConfig:
    """A ``BenchConfig`` from a dict, or a ``ConfigError`` listing every problem (and the valid keys)."""
    return validate_as(BenchConfig, raw)


def load_config(
    path: str | Path, *, overrides: Sequence[str] = (), variant: str | None = None
) -> tuple[BenchConfig, dict[str, Any]]:
    """Read, override and validate a YAML config; returns the config and the raw dict it came from.

    For a config with ``variants``, ``variant`` names the one to load (``load_variants`` loads them all).
    """
    variants, _ = expand_config(path, overrides=overrides)
    if variant is None and len(variants) > 1:
        raise ConfigError(f"{path} has variants {sorted(variants)}: name one (variant=...)")
    name = variant if variant is not None else next(iter(variants))
    if name not in variants:
        raise ConfigError(f"{path} has no variant {name!r}; its variants: {sorted(variants)}")
    return validate_config(variants[name]), variants[name]
