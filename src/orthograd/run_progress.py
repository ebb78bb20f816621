"""The progress of one ``unlearn()`` run on the console, fed by its ``on_eval`` rows.

On a terminal: a rich progress bar (steps done of the budget, the forget and retain metric of the last evaluation,
time left at the current pace; a stop rule usually ends the run before the budget). Elsewhere (logs, CI, pipes):
one plain line per evaluation row.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

SHOWN = ("forget", "retain", "test")


def row_text(row: Mapping[str, Any]) -> str:
    """The metrics of an evaluation row as one short text: ``forget 12.5  retain 97.1  test 95.0``."""
    return "  ".join(f"{key} {row[key]:.1f}" for key in SHOWN if isinstance(row.get(key), (int, float)))


class RunProgress:
    """A context manager whose instance is ``unlearn(on_eval=...)``: it shows each evaluation row as it comes."""

    def __init__(self, console: Console, *, total_steps: int | None, description: str = "unlearning") -> None:
        self.console = console
        self.total_steps = total_steps
        self.description = description
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> RunProgress:
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                TextColumn("{task.fields[metrics]}"), TimeRemainingColumn(), console=self.console, transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total_steps, metrics="")
        return self

    def __call__(self, row: Mapping[str, Any]) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=row.get("step", 0), metrics=row_text(row))
        else:
            self.console.print(f"step {row.get('step', 0):>6}  epoch {row.get('epoch', 0):>3}  {row_text(row)}",
                               highlight=False)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(kind, error, trace)
