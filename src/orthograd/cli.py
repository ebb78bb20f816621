"""The ``orthograd`` command line: ``demo`` (the main job), plus benchmark commands registered below."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Machine unlearning with OrthoGrad.")
console = Console(width=None if sys.stdout.isatty() else 160)  # logs and CI: wide enough for the tables


@app.callback()
def _root() -> None:
    """Machine unlearning with OrthoGrad: demo, benchmarks and reports."""


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for results.jsonl and table.md.")] = Path("runs/demo"),
    method: Annotated[Optional[list[str]], typer.Option(help="Run only these methods (repeatable).")] = None,
) -> None:
    """Train a digits CNN, unlearn with every method (random and class forgetting), print the paper-style table."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from orthograd.demo import run_demo
    from orthograd.reporting import rich_table

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        task = progress.add_task("training the original model", total=None)

        def started(total: int) -> None:
            progress.update(task, total=total, description="unlearning")

        def finished(record: dict) -> None:
            final = record["final"]
            progress.console.log(
                f"{record['scenario']:>6} {record['method']:<10} seed/class {record['seed']}: "
                f"A_u {final['forget']:.1f} A_test {final.get('test', float('nan')):.1f} "
                f"({record['stop_reason']}, {record['steps']} steps, {record['wall_time_s']:.1f}s)"
            )
            progress.advance(task)

        records = run_demo(out_dir=out, method_names=method, on_start=started, on_run=finished)
    title = "Digits, SmallCNN: mean ± std over 3 seeds (random) / 3 classes (class)"
    console.print(rich_table(records, title=title))
    console.print(f"results: {out / 'results.jsonl'}  table: {out / 'table.md'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
