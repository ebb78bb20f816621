"""Task adapters: what a batch means for losses and metrics.

The ASR adapter imports transformers (seconds); it is loaded only when a run asks for ``task="asr"``.
"""

from __future__ import annotations

import importlib
from typing import Any

from orthograd.tasks.base import Task
from orthograd.tasks.causal_lm import CausalLMTask
from orthograd.tasks.classification import ClassificationTask

_TASKS: dict[str, type[Task]] = {ClassificationTask.name: ClassificationTask, CausalLMTask.name: CausalLMTask}
_LAZY: dict[str, tuple[str, str]] = {"asr": ("orthograd.tasks.asr", "ASRTask")}


def get_task(task: str | Task) -> Task:
    """A task adapter from its name (``"classification"``, ``"causal_lm"``, ``"asr"``) or an instance, returned as
    is."""
    if isinstance(task, Task):
        return task
    if task not in _TASKS and task in _LAZY:
        module, name = _LAZY[task]
        _TASKS[task] = getattr(importlib.import_module(module), name)
    try:
        return _TASKS[task]()
    except KeyError:
        raise ValueError(f"unknown task {task!r}; available: {sorted({*_TASKS, *_LAZY})}") from None


def register_task(cls: type[Task]) -> type[Task]:
    """Make a task adapter selectable by its ``name``."""
    _TASKS[cls.name] = cls
    return cls


def __getattr__(name: str) -> Any:
    if name == "ASRTask":
        return importlib.import_module("orthograd.tasks.asr").ASRTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ASRTask", "CausalLMTask", "ClassificationTask", "Task", "get_task", "register_task"]
