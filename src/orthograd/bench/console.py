"""The terminal side of ``orthograd bench``: any task's config on any backend, progress, a line per run, the tables."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orthograd.bench.experiments import experiment_for, load_experiment, resolve_config, run_experiment
from orthograd.bench.printer import RunPrinter


def bench_command(
    path: Path,
    overrides: Sequence[str],
    out: Path | None,
    console: Console,
    *,
    backend: str = "local",
    method_names: Sequence[str] | None = None,
    backend_options: Mapping[str, Any] | None = None,
) -> Path:
    """``run_experiment`` with progress output and the tables printed at the end; returns the run folder.

    ``path``: a config file or a shipped config's name. ``out`` is the run folder, which then holds everything the
    run writes (the model cache too, unless the config sets ``cache_dir``).
    """
    source = resolve_config(path)
    output = [f"output={json.dumps(str(out))}"] if out is not None else []
    configs, _ = load_experiment(source, overrides=[*overrides, *output], methods_kept=method_names)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        printer = RunPrinter(console, line=experiment_for(configs).describe, progress=progress)
        tables: list[Path] = []
        run_experiment(source, overrides=overrides, methods=method_names, out_dir=out, backend=backend,
                       backend_options=backend_options, on_start=printer.started, on_run=printer.finished,
                       on_note=lambda message: console.print(f"[yellow]note:[/yellow] {message}"),
                       on_tables=tables.append)
    for table in tables:
        console.print(table.read_text(encoding="utf-8"))
    return configs[0].run_dir()
