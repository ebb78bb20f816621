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


@app.command()
def bench(
    config: Annotated[Path, typer.Argument(help="Benchmark config (YAML); shipped ones are in configs/.")],
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a config value: dotted.key=value (repeatable).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/<config name>).")] = None,
) -> None:
    """Run a benchmark config; rerunning the same command resumes it, skipping finished runs."""
    from orthograd.bench.config import ConfigError
    from orthograd.bench.console import bench_command, config_task
    from orthograd.bench.report import write_report

    try:
        run_dir = bench_command(config, set_ or [], out, console)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    if config_task(config) != "asr":  # the speaker benchmark writes its own tables
        paths = write_report([run_dir])
        console.print(paths["table"].read_text())
    console.print(f"results: {run_dir / 'results.jsonl'}")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Folders written by `orthograd bench` (combined).")],
    out: Annotated[Optional[Path], typer.Option(help="Where to write (default: the first folder).")] = None,
) -> None:
    """Tables (Markdown, CSV, JSON) and plots from stored benchmark results."""
    from orthograd.bench.report import write_report

    paths = write_report(run_dirs, out_dir=out)
    console.print(paths["table"].read_text())
    for name, path in paths.items():
        console.print(f"{name}: {path}")


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Benchmark config (YAML) with a sweep: block.")],
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a config value: dotted.key=value (repeatable).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/<config name>).")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to join (ray://head:10001, auto); "
                                                        "default: a local Ray cluster for this command.")] = None,
    num_cpus: Annotated[Optional[int], typer.Option(help="CPUs of the local Ray cluster (or local workers).")] = None,
    cpus_per_trial: Annotated[float, typer.Option(help="CPUs reserved per trial (also its torch threads).")] = 1.0,
    gpus_per_trial: Annotated[float, typer.Option(help="GPUs reserved per trial (fractions share a GPU).")] = 0.0,
) -> None:
    """Run a config's sweep grid and test runs as Ray Tune trials (local workers without Ray); rerun to resume."""
    from orthograd.bench.config import ConfigError
    from orthograd.sweep.console import sweep_command

    try:
        run_dir = sweep_command(config, set_ or [], out, console, address=address, num_cpus=num_cpus,
                                cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    console.print(f"results: {run_dir / 'results.jsonl'}")


@app.command("unlearn-ddp")
def unlearn_ddp(
    config: Annotated[Path, typer.Argument(help="Benchmark config (YAML); its methods run on the test split.")],
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a config value: dotted.key=value (repeatable).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/<config name>).")] = None,
    method: Annotated[Optional[list[str]], typer.Option(help="Run only these methods (repeatable).")] = None,
) -> None:
    """Data-parallel unlearning runs; start with: torchrun --nproc_per_node=N --no-python orthograd unlearn-ddp CFG."""
    from orthograd.bench.config import ConfigError
    from orthograd.distributed.console import ddp_command

    try:
        ddp_command(config, set_ or [], out, method, console)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(code=2) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
