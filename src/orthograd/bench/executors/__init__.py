"""Where an experiment's jobs run: the ``Executor`` protocol and the backends, looked up by name (``BACKENDS``).

The engine plans the jobs, skips finished ones and logs each record (``bench.engine.Engine``); an executor only runs
the rest and hands each record back as it finishes. The backends, one module each in this folder: ``local`` (this
process, or the config's ``workers`` processes) and ``processes`` (worker processes) in ``local.py``, ``ray``
(Ray Tune trials) in ``ray_tune.py``, ``ddp`` (torchrun's ranks run each job together) in ``torchrun.py``. A
backend's module is imported only when it is used (Ray and torch.distributed load on demand). A new backend is a
class with ``lead``, ``device``, ``prepare`` and ``run``, and a factory registered here.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

T = TypeVar("T")
Record = dict[str, Any]
OnNote = Callable[[str], None]


class Job(Protocol):
    """One unit of work of an experiment (``bench.engine``); ``key`` identifies its record in the results log."""

    @property
    def key(self) -> str: ...


RunJob = Callable[[Any], Record]  # runs one job, returns its record; picklable for the process-based backends
OnRecord = Callable[[Record], None]


class Executor(Protocol):
    """Runs an experiment's unfinished jobs and hands each record to ``on_record`` as soon as it finishes."""

    lead: bool  # whether this process writes the results log and prints (False on torchrun's ranks but 0)
    # the device this rank runs its share of every job on, when the ranks run each job together (torchrun); None:
    # each job runs whole in one process
    device: torch.device | None

    def prepare(self, setup: Callable[[], T]) -> T:
        """Run ``setup`` (data, the cached original model) in this process before any job; returns its value."""
        ...

    def run(self, jobs: Sequence[Job], run_job: RunJob, *, on_record: OnRecord) -> None:
        """Run every job with ``run_job``; a failed job raises after the records that finished were handed over."""
        ...


# backend -> "module:factory"; a factory takes the config, the run folder, a note callback and its own options
# (keyword-only) and returns a context manager that yields the executor and closes what it started
BACKENDS: dict[str, str] = {
    "local": "orthograd.bench.executors.local:local",
    "processes": "orthograd.bench.executors.local:processes",
    "ray": "orthograd.bench.executors.ray_tune:ray_tune",
    "ddp": "orthograd.bench.executors.torchrun:torchrun",
}


def executor_for(
    backend: str, config: Any, *, run_dir: Path, on_note: OnNote, options: Mapping[str, Any] | None = None,
) -> AbstractContextManager[Executor]:
    """The executor of ``backend`` for ``config`` (an ``ExperimentConfig``), as a context manager; ``options`` are
    the backend's own settings (e.g. ``address`` for ray), an option the backend does not take is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {backend!r}")
    module, name = BACKENDS[backend].split(":")
    factory = getattr(importlib.import_module(module), name)
    given = {k: v for k, v in (options or {}).items() if v is not None}
    accepted = [p for p in inspect.signature(factory).parameters if p not in ("config", "run_dir", "on_note")]
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(f"backend {backend!r} does not take {', '.join(unknown)}; its options: "
                         f"{', '.join(accepted) or 'none'}")
    return factory(config, run_dir=run_dir, on_note=on_note, **given)

