"""The one console printer of finished runs, for every command that runs jobs (``orthograd bench``, ``demo``).

Each task writes the line of its own records (``Experiment.describe``); the printer prints it as the record is
logged, and a phase's count of runs to go (or advances a progress bar).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.progress import Progress, TaskID

RunLine = Callable[[Mapping[str, Any]], str]


class RunPrinter:
    """Prints how many runs a phase has to go and a line per finished run; advances ``progress`` when given one.

    Pass ``started`` and ``finished`` as a bench's ``on_start`` and ``on_run``.
    """

    def __init__(self, console: Console, *, line: RunLine, progress: Progress | None = None) -> None:
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
