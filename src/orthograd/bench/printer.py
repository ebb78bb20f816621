"""The one console printer of finished runs, for every command that runs jobs (bench, sweep, unlearn-ddp, LLM bench).

A run's line names its phase, method, split, retain size and hyperparameters, then what it did: forget accuracy,
accuracy on what it was evaluated on (``A_val`` in a sweep, ``A_test`` otherwise), UIS, stop reason (and a missed
target: the benchmark's line for it, where ``unlearn`` alone would warn), steps, wall time and, for data-parallel
runs, the number of ranks. Another record schema brings its own line (``line=``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.progress import Progress, TaskID

RunLine = Callable[[Mapping[str, Any]], str]


def run_line(record: Mapping[str, Any]) -> str:
    """One line about a finished benchmark run (a ``bench.image`` or ``distributed.bench`` record)."""
    final = record["final"]
    forget_class = record["forget_class"]
    split = f"class {forget_class}" if forget_class is not None else f"seed {record['seed']}"
    hyper = ", ".join(f"{name}={value}" for name, value in record["hyperparameters"].items())
    scored = "A_val" if record["evaluated_on"] == "validation" else "A_test"
    uis = "–" if record["uis"] is None else f"{record['uis']:.3f}"
    ranks = f" on {record['world_size']} ranks" if "world_size" in record else ""
    missed = ", missed the target" if record.get("target_reached") is False else ""
    return (
        f"{record['phase']:>5} {record['method']:<10} {split} retain {record['retain_size']} [{hyper}]: "
        f"A_u {final['forget']:.2f} {scored} {final['test']:.2f} UIS {uis} "
        f"({record['stop_reason']}{missed}, {record['steps']} steps, {record['wall_time_s']:.1f}s{ranks})"
    )


class RunPrinter:
    """Prints how many runs a phase has to go and a line per finished run; advances ``progress`` when given one.

    Pass ``started`` and ``finished`` as a bench's ``on_start`` and ``on_run``.
    """

    def __init__(self, console: Console, *, line: RunLine = run_line, progress: Progress | None = None) -> None:
        self.console = progress.console if progress is not None else console
        self.line = line
        self.progress = progress
        self.task: TaskID | None = None
        if progress is not None:
            self.task = progress.add_task("preparing data and the original model", total=None)

    def started(self, phase: str, todo: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, total=todo, completed=0, description=f"{phase} runs")
        else:
            self.console.log(f"{phase}: {todo} run(s) to run")

    def finished(self, record: Mapping[str, Any]) -> None:
        self.console.log(self.line(record), markup=False)  # hyperparameters in [...] are text, not rich markup
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)
