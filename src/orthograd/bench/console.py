"""The terminal side of ``orthograd bench``: dispatch by task, progress bars, a line per finished run, the table."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orthograd.bench.config import ConfigError, load_config
from orthograd.bench.printer import RunPrinter
from orthograd.bench.runner import run_bench


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


def config_task(path: Path) -> str:
    """The ``task:`` a config file names (image classification when absent)."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; shipped configs: {', '.join(shipped_configs())}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return str(raw.get("task", "classification")) if isinstance(raw, dict) else "classification"


def bench_command(path: Path, overrides: Sequence[str], out: Path | None, console: Console) -> Path:
    """Run (or resume) a benchmark config with progress output; returns the run folder."""
    if config_task(path) == "asr":  # speaker unlearning has its own runner (orthograd.asr_bench)
        from orthograd import asr_bench  # on demand: the speech pipeline loads transformers

        extra = [f"output={out}"] if out is not None else []
        asr_bench.run_config_file(path, [*overrides, *extra])
        return out or Path(asr_bench.load_config(path, overrides).output)
    if config_task(path) == "causal_lm":  # the TOFU-style LLM benchmark has its own runner (orthograd.llm_bench)
        return _llm_bench(path, overrides, out, console)
    config, raw = load_config(path, overrides=overrides)
    run_dir = out or Path("runs") / config.name
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        printer = RunPrinter(console, progress=progress)
        run_bench(config, raw, out_dir=run_dir, on_start=printer.started, on_run=printer.finished)
    return run_dir


def _llm_bench(path: Path, overrides: Sequence[str], out: Path | None, console: Console) -> Path:
    """Run the LLM benchmark and print its tables (they are not the image report's); returns its run folder."""
    from orthograd import llm_bench  # on demand: the language-model pipeline loads transformers

    config = llm_bench.load_config(path, [*overrides, *([f"output={out}"] if out is not None else [])])
    llm_bench.run(config, on_record=RunPrinter(console, line=llm_bench.record_line).finished)
    console.print((Path(config.output) / "tables.md").read_text(encoding="utf-8"))
    return Path(config.output)
