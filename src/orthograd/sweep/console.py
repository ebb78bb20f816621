"""The terminal side of ``orthograd sweep``: load the config, run the sweep with a line per trial, write the report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from orthograd.bench.config import load_config
from orthograd.bench.printer import RunPrinter
from orthograd.bench.report import write_report
from orthograd.sweep.runner import run_sweep


def sweep_command(
    path: Path, overrides: Sequence[str], out: Path | None, console: Console, **options: Any
) -> Path:
    """Run (or resume) the sweep of a config file; ``options`` go to ``run_sweep``. Returns the run folder."""
    config, raw = load_config(path, overrides=overrides)
    run_dir = out or Path("runs") / config.name

    def note(message: str) -> None:
        console.print(f"[yellow]note:[/yellow] {message}")

    printer = RunPrinter(console)
    run_sweep(config, raw, out_dir=run_dir, on_note=note, on_start=printer.started, on_run=printer.finished, **options)
    paths = write_report([run_dir])
    console.print(paths["table"].read_text())
    return run_dir
