"""Any task's config file -> its validated config(s) and its ``Experiment``; where its jobs run.

The tasks and their config classes are one table (``TASKS``): a config's ``task:`` (image classification when
absent) selects its schema in one pydantic discriminated union, so a config is read, overridden and checked the same
way whatever its task, and a typo is an error naming the valid keys. A task's pipeline (transformers for speech and
language models) is imported only when its config is run. A new task is one row here plus its package.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter, ValidationError

from orthograd.bench.config import ConfigError, ExperimentConfig, describe_errors, expand_config
from orthograd.bench.engine import Engine, Experiment, OnRun, OnStart, Record
from orthograd.bench.executors import Executor, ProcessPool

# task -> (module and class of its config, module and class of its experiment)
TASKS: dict[str, tuple[str, str, str, str]] = {
    "classification": ("orthograd.bench.image_config", "BenchConfig", "orthograd.bench.image", "ImageExperiment"),
    "asr": ("orthograd.asr_bench.config", "SpeakerBenchConfig", "orthograd.asr_bench.experiment",
            "SpeakerExperiment"),
    "causal_lm": ("orthograd.llm_bench.config", "AuthorsBenchConfig", "orthograd.llm_bench.experiment",
                  "AuthorsExperiment"),
}


def _attribute(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def task_of(raw: Mapping[str, Any] | ExperimentConfig) -> str:
    """The task a config names (``classification`` when it names none)."""
    value = raw.get("task", "classification") if isinstance(raw, Mapping) else getattr(raw, "task")
    return str(value)


def _schema() -> TypeAdapter[Any]:
    """One union of every task's config class, told apart by ``task``."""
    members = tuple(Annotated[_attribute(module, cls), Tag(task)] for task, (module, cls, _, _) in TASKS.items())
    return TypeAdapter(Annotated[Union[members], Discriminator(task_of)])  # type: ignore[valid-type]


def validate_experiment(raw: Mapping[str, Any]) -> ExperimentConfig:
    """A config of any task from its mapping, or a ``ConfigError`` listing every problem."""
    task = task_of(raw)
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not a benchmark task; tasks: {', '.join(TASKS)}")
    try:
        return _schema().validate_python(dict(raw))
    except ValidationError as exc:
        module, cls, _, _ = TASKS[task]
        lines = describe_errors(exc, root=_attribute(module, cls), tag=task)
        raise ConfigError(f"invalid {task} config:\n  " + "\n  ".join(lines)) from None


def load_experiment(
    path: str | Path, *, overrides: Sequence[str] = ()
) -> tuple[list[ExperimentConfig], dict[str, Any]]:
    """A config file's configs (one per variant; one without variants) and the overridden mapping they came from."""
    variants, raw = expand_config(path, overrides=overrides)
    configs = [validate_experiment(variant) for variant in variants.values()]
    if len(configs) > 1 and task_of(raw) != "classification":
        raise ConfigError(f"variants are for image-classification configs; {path} is a {task_of(raw)} config")
    return configs, raw


def experiment_for(configs: Sequence[ExperimentConfig]) -> Experiment:
    """The experiment that runs ``configs`` (the variants of one config file)."""
    _, _, module, cls = TASKS[task_of(configs[0])]
    experiment_class = _attribute(module, cls)
    return experiment_class(list(configs)) if len(configs) > 1 else experiment_class(configs[0])


def local_executor(config: ExperimentConfig) -> Executor:
    """The config's ``workers`` processes with ``threads_per_worker`` torch threads each (1 worker: this process)."""
    return ProcessPool(workers=config.workers, threads=config.threads_per_worker)


def run_experiment(
    configs: Sequence[ExperimentConfig],
    *,
    raw: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    executor: Executor | None = None,
    on_start: OnStart | None = None,
    on_run: OnRun | None = None,
) -> list[Record]:
    """Run (or resume) the configs' experiment (the variants of one config) into ``out_dir`` (default: the first
    config's run folder) on ``executor`` (default: ``local_executor``); returns the planned records. Without ``raw``
    (the file's mapping), a single config's own values are the config the run folder and its records name."""
    if raw is None and len(configs) == 1:
        raw = configs[0].model_dump(mode="json")
    engine = Engine(experiment_for(configs), out_dir=out_dir or configs[0].run_dir(), raw=raw,
                    executor=executor or local_executor(configs[0]))
    return engine.run(on_start=on_start, on_run=on_run)
