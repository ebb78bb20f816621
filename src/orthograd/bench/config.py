"""The config system every benchmark task shares: one dialect, YAML, ``--set`` overrides, variants, validation,
content hashes.

One dialect for every task. A config names its ``task`` (``classification`` when absent, ``asr``, ``causal_lm``),
its ``name``, its run folder (``output``, default ``runs/<name>``) and how its jobs run (``workers``,
``threads_per_worker``); then three sections with the same names and meaning in every task, whose classes are here:

    methods:                     # the table's rows, by label (MethodRow)
      OrthoGrad: {}              #   method: the label lower-cased when that is a registered method
      OrthoGrad (fixed):
        method: orthograd-fixed  #   else named
        params: {alpha: 0.9}     #   its hyperparameters (over protocol.defaults)
        grid: {lr: [1.0e-3, 1.0e-2]}   # values tuned on validation splits (tuning:); optional
    protocol:                    # what every method of the run shares (ProtocolConfig)
      seeds: [0, 1, 2]           #   the runs' seeds (one run per seed and split)
      stop: ...                  #   the stop rule (its values are the task's: see its config module)
      max_epochs: 30             #   passes over the forget set; and/or
      max_steps: null            #   optimizer steps, the same budget for every method
      eval_every: null           #   check the stop rule every n steps, else
      checks_per_epoch: 4        #   this many times per pass over the forget set (and after every epoch)
      defaults: {}               #   hyperparameters every row starts from
    tuning:                      # how gridded rows are tuned (TuningConfig): never on a test split
      seed: ...                  #   draws the validation splits
      splits: 1                  #   validation splits each grid point is scored on
      search: true               #   false: every row runs its params (its grid unused)
      extend_edges: true         #   a choice on the end of a knob's values: shift them once, search again

Each task's module (``image_bench.config``, ``asr_bench.config``, ``llm_bench.config``) subclasses these three with
the fields only it has (the stop rule's values; the image task's ``track`` and ``privacy``, ``extend_edges``...) and
adds its own sections (its data, model, training, ``scenario``). Every section forbids unknown keys, so a typo is an
error naming the valid keys instead of a silent default (``describe_errors``). ``variants:`` makes one file several
configs (``variants_of``). ``content_hash`` keys caches and records; ``grid_points`` expands a grid. Configs of the
dialect before this one (``runs:``, ``unlearning:``, ``unlearn:``, ``sweep:``) are rewritten by ``orthograd
upgrade-log`` (``bench.upgrade``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orthograd import methods

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A benchmark config that cannot run, with a message that says what to change."""


class ConfigSection(BaseModel):
    """A section of any task's config: immutable, and an unknown key is an error (a typo never becomes a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


DEFAULT_CHECKS_PER_EPOCH = 4  # the stop rule's checks per pass over the forget set (``bench.protocol``)
ROW_FIELDS = frozenset({"label", "method", "params", "grid", "tables"})  # what a methods row may hold (tables: speech)
# sections of the dialect before this one, and where their settings are now (``bench.upgrade`` rewrites them)
FORMER_SECTIONS = {"runs": "methods", "unlearning": "protocol", "unlearn": "protocol",
                   "sweep": "methods.<label>.grid and tuning"}



def older_dialect_parts(raw: Mapping[str, Any]) -> list[str]:
    """What a config mapping (or one of its variants) writes in the dialect before this one, each with its current
    spelling: a former section, ``scenario.seeds``, an image row that is a bare mapping of hyperparameters (the
    older image dialect's; a row with any of a row's own keys is current: a wrong key in it is the schema's error,
    with the valid keys)."""
    found: list[str] = []
    parts = [raw, *((raw.get("variants") or {}).values() if isinstance(raw.get("variants"), Mapping) else [])]
    for part in parts:
        if not isinstance(part, Mapping):
            continue
        found += [f"{name}: is now {FORMER_SECTIONS[name]}" for name in FORMER_SECTIONS if name in part]
        scenario = part.get("scenario")
        if isinstance(scenario, Mapping) and "seeds" in scenario:
            found.append("scenario.seeds: is now protocol.seeds")
        rows = part.get("methods")
        if isinstance(rows, Mapping) and raw.get("task", "classification") == "classification":
            bare = [label for label, row in rows.items()
                    if isinstance(row, Mapping) and row and not set(row) & ROW_FIELDS]
            found += [f"methods.{label}.{key}: is now methods.{label}.params.{key}"
                      for label in bare for key in rows[label]]
    return list(dict.fromkeys(found))


def older_dialect(raw: Mapping[str, Any]) -> bool:
    """Whether a config mapping (or one of its variants) is written in the dialect before this one."""
    return bool(older_dialect_parts(raw))

class MethodRow(ConfigSection):
    """A table row of any task: a labelled, registered method with its hyperparameters, and optionally a ``grid``
    of values to try (``{name: [values]}``), chosen on the task's validation splits (``tuning``)."""

    label: str
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> MethodRow:
        available = methods.available()
        if self.method not in available:
            raise ValueError(f"row {self.label!r}: {self.method!r} is not a registered method; name one with "
                             f"method: ({', '.join(available)})")
        empty = [name for name, values in self.grid.items() if not values]
        if empty:
            raise ValueError(f"row {self.label!r}: grid values must be non-empty lists, got none for {empty}")
        return self


def rows_by_label(value: Any) -> Any:
    """A ``methods:`` mapping with each row's label (its key) and method (when it names none: the label lower-cased)
    filled in, for ``MethodRow`` to validate."""
    if not isinstance(value, Mapping):
        return value  # not a mapping: pydantic names the type it wants
    out = {}
    for label, row in value.items():
        row = {} if row is None else row
        if not isinstance(row, Mapping):
            raise ValueError(f"methods.{label} must be a mapping {{method, params, grid}}, got {row!r}")
        if row.get("label", label) != label:
            raise ValueError(f"methods.{label}: its label is its key; drop label: {row['label']!r}")
        out[str(label)] = {**row, "label": str(label), "method": row.get("method", str(label).lower())}
    return out


class ProtocolConfig(ConfigSection):
    """What every method of a benchmark shares: seeds, stop rule, budget, the stop rule's cadence, default
    hyperparameters. A task's subclass types ``stop`` and adds what only it has."""

    seeds: tuple[int, ...] = (0, 1, 2)
    stop: Any = None
    max_epochs: int | None = Field(default=30, ge=1)
    max_steps: int | None = Field(default=None, ge=1)  # the same optimizer-step budget for every method
    eval_every: int | None = Field(default=None, ge=1)  # check the stop rule every n steps, for every method
    checks_per_epoch: int = Field(default=DEFAULT_CHECKS_PER_EPOCH, ge=1)  # else: per pass over the forget set
    defaults: dict[str, Any] = Field(default_factory=dict)  # hyperparameters every row starts from

    @model_validator(mode="after")
    def _budget(self) -> ProtocolConfig:
        if not self.seeds:
            raise ValueError("protocol.seeds must list at least one seed")
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("protocol needs a budget: set max_epochs, max_steps or both")
        return self


class TuningConfig(ConfigSection):
    """How a gridded row is tuned: each grid point runs on ``splits`` validation splits drawn with ``seed`` (none
    shares a sample with a test split), and the task's score picks one. A task's subclass adds what only it has."""

    seed: int = 0
    splits: int = Field(default=1, ge=1)
    search: bool = True  # false: every row runs its params, its grid unused (e.g. a paper's optima without its search)
    extend_edges: bool = True  # a choice at the end of a knob's values shifts them once and searches again


class ExperimentConfig(ConfigSection):
    """What every experiment config has, whatever its task: its name, run folder and how its jobs run, its rows
    (``methods``), the protocol they share and how gridded rows are tuned.

    Each task's config (``image_bench.config``, ``asr_bench.config``, ``llm_bench.config``) extends it with a
    ``task`` tag, its own sections and its subclasses of the shared ones; ``bench.experiments.load_experiment``
    reads any of them. ``EXECUTION_FIELDS`` change where and how fast jobs run, never what a record holds, so no
    record key includes them.
    """

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"name", "output", "workers", "threads_per_worker"})

    name: str
    output: Path | None = None  # the run folder (None: runs/<name>)
    workers: int = Field(default=1, ge=1)  # worker processes for the jobs (1: in this process)
    threads_per_worker: int | None = Field(default=None, ge=1)  # torch threads per worker (None: cores/workers)
    methods: Mapping[str, MethodRow]
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)

    @field_validator("methods", mode="before")
    @classmethod
    def _labelled(cls, value: Any) -> Any:
        return rows_by_label(value)

    @field_validator("methods")
    @classmethod
    def _some_rows(cls, value: Mapping[str, MethodRow]) -> Mapping[str, MethodRow]:
        if not value:
            raise ValueError("methods must list at least one row")
        return value

    def run_dir(self) -> Path:
        """Where the results log, tables and plots go."""
        return self.output if self.output is not None else Path("runs") / self.name

    def params(self, row: MethodRow) -> dict[str, Any]:
        """A row's hyperparameters: ``protocol.defaults``, then the row's own."""
        return {**self.protocol.defaults, **row.params}

    def gridded(self) -> list[MethodRow]:
        """The rows with a grid, which are tuned on validation splits before they run on test (none when
        ``tuning.search`` is false)."""
        return [row for row in self.methods.values() if row.grid] if self.tuning.search else []


def content_hash(value: Any, *, length: int = 16) -> str:
    """Short, stable hash (SHA-256 hex prefix) of a JSON-able value: the identity of a config, a record, a model.

    The value is written as JSON with sorted keys and no spaces, so equal values hash equal whatever their key order;
    this is the one hashing convention of every task's record keys and stored-model names.
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
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
            raise ConfigError(f"--set expects key=value (e.g. protocol.max_epochs=5), got {item!r}")
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


def _has_tag(model: type[BaseModel], tag: Any) -> bool:
    """Whether one of ``model``'s fields is a ``Literal`` that admits ``tag`` (the member of a tagged union)."""
    fields = model.model_fields.values()
    return any(get_origin(f.annotation) is Literal and tag in get_args(f.annotation) for f in fields)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field annotation may hold (several for the tagged model union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _valid_keys(loc: Sequence[Any], root: type[BaseModel]) -> str:
    """The keys accepted by the section of ``root`` that holds the unknown key at ``loc``."""
    candidates: list[type[BaseModel]] = [root]
    keyed = False  # the part is a key of a mapping of sections (a methods row's label)
    for part in loc[:-1]:
        if isinstance(part, int) or keyed:  # an item of a list or mapping: its model is already the candidate
            keyed = False
            continue
        if len(candidates) > 1:  # a tagged union: pydantic puts the tag (e.g. model.arch's value) in the location
            candidates = [m for m in candidates if _has_tag(m, part)] or candidates
            continue
        field = candidates[0].model_fields.get(str(part))
        candidates = _models_in(field.annotation) if field is not None else []
        keyed = field is not None and get_origin(field.annotation) in (dict, Mapping)
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
