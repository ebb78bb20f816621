"""Task adapters: what a batch means for losses and metrics."""

from __future__ import annotations

from orthograd.tasks.asr import ASRTask
from orthograd.tasks.base import Task
from orthograd.tasks.classification import ClassificationTask

_TASKS: dict[str, type[Task]] = {ClassificationTask.name: ClassificationTask, ASRTask.name: ASRTask}


def get_task(task: str | Task) -> Task:
    """A task adapter from its name (``"classification"``) or an instance, returned as is."""
    if isinstance(task, Task):
        return task
    try:
        return _TASKS[task]()
    except KeyError:
        raise ValueError(f"unknown task {task!r}; available: {sorted(_TASKS)}") from None


def register_task(cls: type[Task]) -> type[Task]:
    """Make a task adapter selectable by its ``name``."""
    _TASKS[cls.name] = cls
    return cls


__all__ = ["ASRTask", "ClassificationTask", "Task", "get_task", "register_task"]
