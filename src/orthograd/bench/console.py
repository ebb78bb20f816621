"""The terminal side of ``orthograd bench``: any task's config, progress bars, a line per finished run, the table."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orthograd.bench.config import ConfigError, ExperimentConfig
from orthograd.bench.engine import Engine
from orthograd.bench.executors import Executor
from orthograd.bench.experiments import canonical_methods, experiment_for, load_experiment, local_executor
from orthograd.bench.printer import RunPrinter
from orthograd.choices import check_choice

Backend = Literal["local", "ray", "ddp"]


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


def bench_command(
    path: Path,
    overrides: Sequence[str],
    out: Path | None,
    console: Console,
    *,
    backend: Backend = "local",
    method_names: Sequence[str] | None = None,
    trial_options: Mapping[str, Any] | None = None,
) -> Path:
    """Run (or resume) any task's config with progress output, then print its tables; returns the run folder.

    ``backend``: ``local`` (this process, or the config's ``workers`` processes), ``ray`` (Ray Tune trials,
    ``sweep.runner.trial_executor(**trial_options)``) or ``ddp`` (data-parallel runs of an image config's test
    jobs on torchrun's ranks). ``method_names`` (any case) keeps only those methods. ``out`` is the run folder,
    which then holds everything the run writes (the model cache too, unless the config sets ``cache_dir``).
    """
    check_choice("backend", backend, Backend)
    names = canonical_methods(method_names) if method_names else None
    overrides = [*overrides, f"output={json.dumps(str(out))}"] if out is not None else list(overrides)
    if backend == "ddp":
        from orthograd.distributed.console import ddp_command  # torch.distributed set-up, on demand

        return ddp_command(path, overrides, out, names, console)
    configs, raw = load_experiment(path, overrides=overrides, methods_kept=names)
    run_dir = configs[0].run_dir()
    experiment = experiment_for(configs)
    with _executor(backend, configs[0], run_dir, trial_options or {}, console) as executor, Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        printer = RunPrinter(console, line=experiment.describe, progress=progress)
        engine = Engine(experiment, out_dir=run_dir, raw=raw, executor=executor)
        engine.run(on_start=printer.started, on_run=printer.finished)
    if engine.tables is not None:
        console.print(engine.tables.read_text(encoding="utf-8"))
    return run_dir


def _executor(
    backend: Backend, config: ExperimentConfig, run_dir: Path, trial_options: Mapping[str, Any], console: Console
) -> AbstractContextManager[Executor]:
    if backend == "local":
        return nullcontext(local_executor(config))
    from orthograd.sweep.runner import trial_executor  # Ray, when installed, on demand

    def note(message: str) -> None:
        console.print(f"[yellow]note:[/yellow] {message}")

    return trial_executor(out_dir=run_dir, on_note=note, **trial_options)
