"""The terminal side of ``orthograd sweep``: load the config, run the sweep with a line per trial, write the report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from orthograd.bench.config import load_config
from orthograd.bench.report import write_report
from orthograd.sweep.runner import run_sweep


def sweep_command(
    path: Path, overrides: Sequence[str], out: Path | None, console: Console, **options: Any
) -> Path:
    """Run (or resume) the sweep of a config file; ``options`` go to ``run_sweep``. Returns the run folder."""
    config, raw = load_config(path, overrides=overrides)
    run_dir = out or Path("runs") / config.name

    def started(phase: str, todo: int) -> None:
        console.log(f"{phase}: {todo} trial(s) to run")

    def finished(record: dict[str, Any]) -> None:
        uis = "–" if record["uis"] is None else f"{record['uis']:.3f}"
        console.log(f"{record['phase']:>5} {record['method']:<10} {record['hyperparameters']} UIS {uis} "
                    f"({record['evaluated_on']})")

    def note(message: str) -> None:
        console.print(f"[yellow]note:[/yellow] {message}")

    run_sweep(config, raw, out_dir=run_dir, on_note=note, on_start=started, on_run=finished, **options)
    paths = write_report([run_dir])
    console.print(paths["table"].read_text())
    return run_dir
