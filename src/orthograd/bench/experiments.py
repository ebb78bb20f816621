"""Any task's config file -> its validated config(s) and its ``Experiment``, and the one way to run it
(``run_experiment``, which ``orthograd bench`` calls).

Each task package declares its task, config class and experiment class (``benchmark_tasks``): a config's
``task:`` (image classification when absent) selects its schema in one pydantic discriminated union, so a config is
read, overridden and checked the same way whatever its task, and a typo is an error naming the valid keys. A task's
pipeline (transformers for speech and language models) is imported only when its config is run. A new task is its
package alone.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import logging
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter, ValidationError

from orthograd import methods
from orthograd.bench.config import ConfigError, ExperimentConfig, describe_errors, expand_config, older_dialect_parts
from orthograd.bench.engine import (
    RESULTS_FILE,
    Engine,
    Experiment,
    FinishedRuns,
    NotFinished,
    OnRun,
    OnStart,
    Record,
)
from orthograd.bench.executors import Executor, OnNote, executor_for
from orthograd.io import ResultsLog

log = logging.getLogger(__name__)
TASK_PACKAGE_SUFFIX = "_bench"  # orthograd's subpackages with this suffix are searched for benchmark tasks


@functools.cache
def benchmark_tasks() -> dict[str, tuple[str, str, str, str]]:
    """Every benchmark task by its ``task:`` name -> (module and class of its config, module and class of its
    experiment).

    Each ``orthograd.*_bench`` package declares its task in its ``__init__`` as ``BENCHMARK_TASK = (name,
    "module:ConfigClass", "module:ExperimentClass")``, so a new task is its package alone. Only those light
    ``__init__`` modules are imported here; a task's pipeline loads when one of its configs runs.
    """
    tasks: dict[str, tuple[str, str, str, str]] = {}
    root = str(Path(__file__).resolve().parents[1])
    for package in pkgutil.iter_modules([root]):
        if not (package.ispkg and package.name.endswith(TASK_PACKAGE_SUFFIX)):
            continue
        declared = getattr(importlib.import_module(f"orthograd.{package.name}"), "BENCHMARK_TASK", None)
        if declared is None:
            continue
        name, config, experiment = declared
        if name in tasks:
            raise ConfigError(f"two packages declare the benchmark task {name!r}; the second is {package.name}")
        (config_module, config_class), (experiment_module, experiment_class) = (
            config.split(":"), experiment.split(":"))
        tasks[name] = (config_module, config_class, experiment_module, experiment_class)
    return tasks


def _attribute(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def task_of(raw: Mapping[str, Any] | ExperimentConfig) -> str:
    """The task a config names (``classification`` when it names none)."""
    value = (raw.get("task", "classification") if isinstance(raw, Mapping)
             else raw.model_dump(include={"task"})["task"])
    return str(value)


def _schema() -> TypeAdapter[Any]:
    """One union of every task's config class, told apart by ``task``."""
    members = tuple(Annotated[_attribute(module, cls), Tag(task)]
                    for task, (module, cls, _, _) in benchmark_tasks().items())
    # Union[...] of a tuple built at run time: the | operator has no spelling for it
    return TypeAdapter(Annotated[Union[members], Discriminator(task_of)])  # type: ignore[arg-type]  # noqa: UP007


def validate_experiment(raw: Mapping[str, Any]) -> ExperimentConfig:
    """A config of any task from its mapping, or a ``ConfigError`` listing every problem."""
    task = task_of(raw)
    if task not in benchmark_tasks():
        raise ConfigError(f"task {task!r} is not a benchmark task; tasks: {', '.join(benchmark_tasks())}")
    moved = older_dialect_parts(raw)
    if moved:
        raise ConfigError(f"this config uses names of the older config dialect ({'; '.join(moved)}): in a --set "
                          "override, write the current name (e.g. --set tuning.search=false for sweep=null); a config "
                          "file is rewritten by `orthograd upgrade-log FILE.yaml`, a run folder by `orthograd "
                          "upgrade-log RUN_DIR/results.jsonl` (docs/reference.md, Benchmark configs)")
    try:
        return _schema().validate_python(dict(raw))
    except ValidationError as exc:
        module, cls, _, _ = benchmark_tasks()[task]
        lines = describe_errors(exc, root=_attribute(module, cls), tag=task)
        raise ConfigError(f"invalid {task} config:\n  " + "\n  ".join(lines)) from None


def canonical_methods(names: Sequence[str]) -> list[str]:
    """Registered method names for ``names`` in any case (``OrthoGrad`` is ``orthograd``); an unknown name is an
    error suggesting the closest registered one."""
    available = methods.available()
    out = []
    for name in names:
        key = name.lower()
        if key not in available:
            close = difflib.get_close_matches(key, available, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown method {name!r}: {hint}available: {', '.join(available)}")
        out.append(key)
    return out


def _row_method(label: str, row: Any) -> str:
    """The method a ``methods:`` row runs (as ``bench.config.rows_by_label`` reads it)."""
    named = row.get("method") if isinstance(row, Mapping) else None
    return str(named if named is not None else label).lower()


def _kept_rows(rows: Any, keep: set[str]) -> Any:
    if not isinstance(rows, Mapping):
        return rows
    return {label: row for label, row in rows.items() if _row_method(label, row) in keep}


def keep_methods(raw: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """A config mapping with only the rows whose method is one of ``names`` (any case), in its base and in each
    variant; none of them in the config is an error."""
    keep = set(canonical_methods(names))
    out = {**raw, "methods": _kept_rows(raw.get("methods"), keep)}
    if isinstance(raw.get("variants"), Mapping):
        out["variants"] = {
            name: {**changes, "methods": _kept_rows(changes["methods"], keep)}
            if isinstance(changes, Mapping) and "methods" in changes else changes
            for name, changes in raw["variants"].items()
        }
    if not out["methods"]:
        listed = [_row_method(label, row) for label, row in (raw.get("methods") or {}).items()]
        raise ConfigError(f"--method {', '.join(names)}: the config has none of them; its methods: "
                          f"{', '.join(dict.fromkeys(listed))}")
    return out


def load_experiment(
    path: str | Path, *, overrides: Sequence[str] = (), methods_kept: Sequence[str] | None = None,
) -> tuple[list[ExperimentConfig], dict[str, Any]]:
    """A config file's configs (one per variant; one without variants) and the overridden mapping they came from
    (``methods_kept``: only those methods, ``keep_methods``)."""
    variants, raw = expand_config(path, overrides=overrides)
    if methods_kept:
        variants = {name: keep_methods(variant, methods_kept) for name, variant in variants.items()}
        raw = keep_methods(raw, methods_kept)
    configs = [validate_experiment(variant) for variant in variants.values()]
    if len(configs) > 1 and task_of(raw) != "classification":
        raise ConfigError(f"variants are for image-classification configs; {path} is a {task_of(raw)} config")
    return configs, raw


def experiment_for(configs: Sequence[ExperimentConfig]) -> Experiment:
    """The experiment that runs ``configs`` (the variants of one config file)."""
    _, _, module, cls = benchmark_tasks()[task_of(configs[0])]
    experiment_class = _attribute(module, cls)
    return experiment_class(list(configs)) if len(configs) > 1 else experiment_class(configs[0])


def run_experiment(
    config: str | Path | ExperimentConfig | Sequence[ExperimentConfig],
    *,
    overrides: Sequence[str] = (),
    methods: Sequence[str] | None = None,
    raw: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    backend: str | Executor = "local",
    backend_options: Mapping[str, Any] | None = None,
    on_start: OnStart | None = None,
    on_run: OnRun | None = None,
    on_note: OnNote = log.warning,
    on_tables: Callable[[Path], None] | None = None,
) -> list[Record]:
    """Run (or resume) any task's config; returns its planned records (every phase, in plan order).

    ``config``: a config file (or a shipped config's name), read with ``overrides`` (``dotted.key=value``) and only
    the ``methods`` named (any case); or the validated config(s) of one file (its variants), with ``raw`` the file's
    mapping that the run folder's ``config.yaml`` and the records' config hash name (default: the config's own
    values). ``out_dir``: the run folder (default: the config's ``output``, else ``runs/<name>``); for a file it is
    the config's ``output``, so the model cache goes there too unless the config sets ``cache_dir``.
    ``backend``: where the jobs run, a name of ``bench.executors.BACKENDS`` with its ``backend_options``, or an
    ``Executor``. ``on_start(phase, todo)`` and ``on_run(record)`` follow the run, ``on_note`` gets the backend's
    notes, ``on_tables(path)`` the Markdown tables once written.
    """
    if isinstance(config, (str, Path)):
        output = [f"output={json.dumps(str(out_dir))}"] if out_dir is not None else []
        configs, raw = load_experiment(resolve_config(Path(config)), overrides=[*overrides, *output],
                                       methods_kept=methods)
    else:
        if overrides or methods:
            raise ValueError("overrides and methods apply to a config file: pass its path, or change the config")
        configs = [config] if isinstance(config, ExperimentConfig) else list(config)
        if raw is None and len(configs) == 1:
            raw = configs[0].model_dump(mode="json")
    run_dir = Path(out_dir) if out_dir is not None else configs[0].run_dir()
    chosen = nullcontext(backend) if not isinstance(backend, str) else executor_for(
        backend, configs[0], run_dir=run_dir, options=backend_options, on_note=on_note)
    with chosen as executor:
        engine = Engine(experiment_for(configs), out_dir=run_dir, raw=raw, executor=executor)
        records = engine.run(on_start=on_start, on_run=on_run)
    if engine.tables is not None and on_tables is not None:
        on_tables(engine.tables)
    return records


def write_run_tables(run_dir: str | Path, *, out_dir: str | Path | None = None) -> Path | None:
    """Regenerate a run folder's tables from its ``config.yaml`` and results log, as the run wrote them (the
    experiment's plan replayed over the logged records, nothing run), into ``out_dir`` (default: the folder). A run
    still under way gives the tables of what it has logged: planning stops at the first phase that needs a record
    the log does not hold yet."""
    folder = Path(run_dir)
    if not (folder / "config.yaml").is_file() or not (folder / RESULTS_FILE).is_file():
        raise ConfigError(f"{folder} is not a run folder of `orthograd bench` (it needs config.yaml and "
                          f"{RESULTS_FILE})")
    configs, _ = load_experiment(folder / "config.yaml")
    experiment = experiment_for(configs)
    finished = FinishedRuns(ResultsLog(folder / RESULTS_FILE), experiment.record_key)
    planned: list[str] = []
    try:
        for phase in experiment.plan(finished):
            planned += [job.key for job in phase.jobs]
    except NotFinished:
        pass  # a later phase waits on records of this one that the run has not logged yet
    records = [finished[key] for key in dict.fromkeys(planned) if key in finished]
    if not records:
        raise ConfigError(f"{folder / RESULTS_FILE} holds no record of this config's runs")
    return experiment.write_tables(records, Path(out_dir) if out_dir is not None else folder)


def shipped_configs() -> dict[str, Path]:
    """The configs installed with the package, by name (file name without ``.yaml``)."""
    folder = Path(str(resources.files("orthograd") / "configs"))
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def resolve_config(path: Path) -> Path:
    """``path`` when it is a file, else the shipped config of that name (``demo`` or ``demo.yaml``)."""
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and name in shipped:
        return shipped[name]
    raise ConfigError(f"config file {str(path)!r} does not exist; shipped configs: {', '.join(shipped)}")
