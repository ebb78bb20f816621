"""Benchmark configs: a YAML file validated by pydantic, ``--set key=value`` overrides and content hashes.

Every section forbids unknown keys, so a typo is an error naming the valid keys instead of a silent default.
Method hyperparameters are checked against the method's own config class when the file is loaded, so a bad
learning rate fails before any model is trained. The hash of the parts that determine the original model
(data, model, training) keys its cache; the hash of a whole section keys a results record.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orthograd import methods


ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A benchmark config that cannot run, with a message that says what to change."""


class ConfigSection(BaseModel):
    """A section of any task's config: immutable, and an unknown key is an error (a typo never becomes a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RunRow(ConfigSection):
    """A table row of the speech and language-model benchmarks: a labelled method with its hyperparameters, and
    optionally a ``grid`` of values to try (``{name: [values]}``), chosen on the task's validation data."""

    label: str
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _grid_values(self) -> "RunRow":
        empty = [name for name, values in self.grid.items() if not values]
        if empty:
            raise ValueError(f"run {self.label!r}: grid values must be non-empty lists, got none for {empty}")
        return self


def unique_labels(runs: Sequence[RunRow]) -> None:
    """Refuse two rows with one label (their records would share a name in the tables)."""
    labels = [run.label for run in runs]
    if len(labels) != len(set(labels)):
        raise ValueError(f"run labels must be unique, got {labels}")


class ExperimentConfig(ConfigSection):
    """What every experiment config has, whatever its task: its name, its run folder and how its jobs run.

    Each task's config (``BenchConfig`` here, ``asr_bench.config``, ``llm_bench.config``) extends it with a
    ``task`` tag; ``bench.experiments.load_experiment`` reads any of them. ``EXECUTION_FIELDS`` change where and
    how fast jobs run, never what a record holds, so no record key includes them.
    """

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"name", "output", "workers", "threads_per_worker"})

    name: str
    output: Path | None = None  # the run folder (None: runs/<name>)
    workers: int = Field(default=1, ge=1)  # worker processes for the jobs (1: in this process)
    threads_per_worker: int | None = Field(default=None, ge=1)  # torch threads per worker (None: cores/workers)

    def run_dir(self) -> Path:
        """Where the results log, tables and plots go."""
        return self.output if self.output is not None else Path("runs") / self.name


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
    def _root_needed(self) -> "DataConfig":
        if self.name in ("cifar10", "imagenet") and self.root is None:
            raise ValueError(f"data.root is required for {self.name}: the folder that holds your local copy")
        return self


class SmallCNNConfig(ConfigSection):
    arch: Literal["small_cnn"]
    width: int = Field(default=16, ge=1)
    norm: Literal["group", "batch", "none"] = "group"
    weights: Path | None = None


class ResNet18Config(ConfigSection):
    arch: Literal["resnet18"]
    stem: Literal["cifar", "imagenet"] = "imagenet"  # cifar: 3x3 stride-1 first conv, no max-pool
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
    """What is forgotten: ``random`` samples (one split per seed) or a whole ``class`` (one split per class)."""

    kind: Literal["random", "class"]
    forget_size: int | None = Field(default=None, ge=1)
    retain_size: list[int]
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    classes: list[int] = Field(default_factory=list)
    retrain: bool = False

    @field_validator("retain_size", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @model_validator(mode="after")
    def _consistent(self) -> "ScenarioConfig":
        if not self.retain_size or min(self.retain_size) < 1:
            raise ValueError("scenario.retain_size must be a positive size or a non-empty list of them")
        if self.kind == "random":
            if self.forget_size is None:
                raise ValueError("scenario.forget_size is required when scenario.kind is 'random'")
            if not self.seeds:
                raise ValueError("scenario.seeds must list at least one seed")
            if self.classes:
                raise ValueError("scenario.classes is for kind 'class'; random forgetting uses scenario.seeds")
        else:
            if not self.classes:
                raise ValueError("scenario.classes must list the classes to forget when scenario.kind is 'class'")
            if self.forget_size is not None:
                raise ValueError("scenario.forget_size is for kind 'random'; class forgetting forgets the whole class")
        return self


class UnlearnConfig(ConfigSection):
    """The run protocol shared by every method: epoch cap, evaluation schedule and the paper's stopping rule."""

    max_epochs: int = Field(default=30, ge=1)
    eval_every: int | None = Field(default=None, ge=1)  # evaluate every n steps (None: after every epoch)
    stop: bool = True  # the paper's rule for the scenario (random: A_u <= A_test^p + 0.5; class: A_u < 1%)
    # "stop": rows between the first and the last evaluate only the forget set (what the rule reads), the last row
    # every set; evaluation is ~40-80% of an iterative method's time here (benchmarks/bench_profile.py), at the cost
    # of the retain/test trajectories in trajectories.png
    track: Literal["all", "stop"] = "all"
    privacy: bool = True  # membership-inference metrics of every test run (the MIA columns of the tables)


class SweepConfig(ConfigSection):
    """A grid per method, scored by UIS on the validation split; the best point is then run on test."""

    grid: dict[str, dict[str, list[Any]]]
    splits: int = Field(default=1, ge=1)  # how many of the scenario's splits (seeds/classes) each point is scored on
    retain_size: int | None = Field(default=None, ge=1)  # the retain size the grid is scored at (None: the first)


class BenchConfig(ExperimentConfig):
    """An image-classification benchmark: data, model, original training, scenario, methods, protocol."""

    task: Literal["classification"] = "classification"
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    scenario: ScenarioConfig
    methods: dict[str, dict[str, Any]]
    unlearn: UnlearnConfig = Field(default_factory=UnlearnConfig)
    sweep: SweepConfig | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: Path = Path("runs/cache")

    @field_validator("methods")
    @classmethod
    def _methods_known(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not value:
            raise ValueError("methods must name at least one method")
        for name, hyper in value.items():
            methods.make_config(name, hyper or {})  # unknown method or hyperparameter: the method's own error
        return {name: dict(hyper or {}) for name, hyper in value.items()}

    @model_validator(mode="after")
    def _cross_checks(self) -> "BenchConfig":
        if self.unlearn.track == "stop" and not self.unlearn.stop:
            raise ValueError("unlearn.track 'stop' evaluates what the stopping rule reads: set unlearn.stop true")
        if self.train.epochs == 0 and self.model.weights is None:
            raise ValueError("train.epochs is 0 (use model.weights as the original model) but model.weights is not set")
        if self.sweep is not None:
            if self.data.validation_size < 1:
                raise ValueError("a sweep selects on the validation split: set data.validation_size > 0")
            for name, grid in self.sweep.grid.items():
                if name not in self.methods:
                    raise ValueError(f"sweep.grid names {name!r}, which is not in methods {sorted(self.methods)}")
                for key, values in grid.items():
                    if not values:
                        raise ValueError(f"sweep.grid.{name}.{key} is an empty list")
                    for value in values:
                        methods.make_config(name, {**self.methods[name], key: value})
            n_splits = len(self.scenario.seeds if self.scenario.kind == "random" else self.scenario.classes)
            if self.sweep.splits > n_splits:
                raise ValueError(f"sweep.splits is {self.sweep.splits} but the scenario has {n_splits} splits")
            if self.sweep.retain_size is not None and self.sweep.retain_size not in self.scenario.retain_size:
                raise ValueError(f"sweep.retain_size is {self.sweep.retain_size}, which is not one of "
                                 f"scenario.retain_size {self.scenario.retain_size}")
        return self

    def original_hash(self) -> str:
        """Hash of what determines the original model: data, model and training settings (``train.init_seed`` only
        when set, so that the models made before it existed keep their cache entries)."""
        unset = {"init_seed"} if self.train.init_seed is None else None
        return content_hash(
            {"data": self.data.model_dump(mode="json"), "model": self.model.model_dump(mode="json"),
             "train": self.train.model_dump(mode="json", exclude=unset)}
        )


def content_hash(value: Any, *, length: int = 16, sort_keys: bool = True, compact: bool = True) -> str:
    """Short, stable hash (SHA-256 hex prefix) of a JSON-able value: the identity of a config, a record, a model.

    ``sort_keys`` and ``compact`` (JSON without spaces) are how the value is written before hashing; the speech and
    language-model benchmarks first wrote their keys with spaces (and the speech one unsorted), and keep doing so
    that their results logs and stored models are found again.
    """
    separators = (",", ":") if compact else None
    text = json.dumps(value, sort_keys=sort_keys, separators=separators, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of a ``{name: [values]}`` grid, in the order the grid lists names and values."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``dotted.key=value`` set (the value parsed as YAML: numbers, lists, null)."""
    out: dict[str, Any] = json.loads(json.dumps(raw, default=str))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (e.g. unlearn.max_epochs=5), got {item!r}")
        parts = key.strip().split(".")
        node: Any = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {key}: {where} is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text)
    return out


def _describe(error: Mapping[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return f"unknown key {where!r}"
    return f"{where}: {error['msg']}"


_MODEL_ARCHS: dict[str, type[BaseModel]] = {
    "small_cnn": SmallCNNConfig, "resnet18": ResNet18Config, "vit_b_16": ViTConfig,
}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field annotation may hold (several for the tagged model union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _valid_keys(loc: Sequence[Any], root: type[BaseModel]) -> str:
    """The keys accepted by the section of ``root`` that holds the unknown key at ``loc``."""
    candidates: list[type[BaseModel]] = [root]
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list section: its model is already the candidate
            continue
        if len(candidates) > 1:  # a tagged union: pydantic puts the tag (model.arch) in the location
            candidates = [_MODEL_ARCHS[part]] if part in _MODEL_ARCHS else candidates
            continue
        field = candidates[0].model_fields.get(str(part))
        candidates = _models_in(field.annotation) if field is not None else []
        if not candidates:
            return "(see the config reference)"
    return ", ".join(sorted(candidates[0].model_fields))


def describe_errors(exc: ValidationError, *, root: type[BaseModel], tag: str | None = None) -> list[str]:
    """One line per problem of a config of class ``root``, an unknown key with the valid keys beside it (``tag``: the
    union tag pydantic puts first in each location when ``root`` was validated as a member of a tagged union)."""
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        if tag is not None and loc[:1] == (tag,):
            loc = loc[1:]
        line = _describe({**error, "loc": loc})
        if error["type"] == "extra_forbidden":
            line += f"; valid keys here: {_valid_keys(loc, root)}"
        lines.append(line)
    return lines


def validate_as(cls: type[ConfigT], raw: Mapping[str, Any]) -> ConfigT:
    """``raw`` as a ``cls`` config, or a ``ConfigError`` listing every problem (and the valid keys)."""
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        lines = describe_errors(exc, root=cls)
        raise ConfigError(f"invalid {cls.__name__}:\n  " + "\n  ".join(lines)) from None


def validate_config(raw: Mapping[str, Any]) -> BenchConfig:
    """A ``BenchConfig`` from a dict, or a ``ConfigError`` listing every problem (and the valid keys)."""
    return validate_as(BenchConfig, raw)


def read_config(path: str | Path, *, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The YAML mapping of a config file with each ``--set`` override applied (not validated)."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"config file {str(source)!r} does not exist (shipped configs are in configs/)")
    raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a benchmark config is a YAML mapping (name:, data:, model:, ...)")
    return apply_overrides(raw, overrides)


def variants_of(raw: Mapping[str, Any], *, overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """A config's variants, each the config's mapping with the variant's sections merged in (key by key).

    A config with ``variants: {NAME: {section: {key: value}}, ...}`` is several configs that share everything but
    what each variant sets, run into one folder and reported in one table (the demo: random and class forgetting,
    each with its tuned hyperparameters). A config without ``variants`` is its own single variant, named "".
    ``overrides`` apply to each variant after the merge, so ``methods={...}`` sets every variant's methods (an
    override of ``variants.*`` belongs in ``read_config``'s instead).
    """
    base = {k: v for k, v in raw.items() if k != "variants"}
    variants = raw.get("variants")
    if variants is None:
        return {"": apply_overrides(base, overrides)}
    if not isinstance(variants, dict) or not variants:
        raise ConfigError("variants must map each variant's name to the sections it changes (e.g. {class: {...}})")
    return {name: apply_overrides(_merged(base, changes or {}), overrides) for name, changes in variants.items()}


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--set`` overrides of the variants themselves (``variants...``), and those of every variant's config."""
    of_variants = [o for o in overrides if o.partition("=")[0].strip().split(".")[0] == "variants"]
    return of_variants, [o for o in overrides if o not in of_variants]


def expand_config(path: str | Path, *, overrides: Sequence[str] = ()) -> tuple[dict[str, dict[str, Any]], dict]:
    """A config file's variants with the overrides applied (``variants_of``), and the file's overridden mapping."""
    of_variants, of_configs = split_overrides(overrides)
    raw = read_config(path, overrides=of_variants)
    return variants_of(raw, overrides=of_configs), apply_overrides(raw, of_configs)


def _merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        both_sections = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merged(out[key], value) if both_sections else value
    return out


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
