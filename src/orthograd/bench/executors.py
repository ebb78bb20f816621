"""Where a bench's jobs run: one ``Executor`` protocol, with the local backends (this process, worker processes).

The engine plans the jobs, skips finished ones and logs each record (``bench.engine.Engine``); an executor only runs
the rest and hands each record back as it finishes. The other backends: Ray Tune trials
(``sweep.ray_trials.RayTune``, ``orthograd sweep``) and torchrun's ranks (``distributed.bench.DataParallel``,
``orthograd unlearn-ddp``). A new backend is one class with these three members.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Protocol, TypeVar

import torch

T = TypeVar("T")
Record = dict[str, Any]


class Job(Protocol):
    """One unit of work of an experiment (``bench.engine``); ``key`` identifies its record in the results log."""

    @property
    def key(self) -> str: ...


RunJob = Callable[[Any], Record]  # runs one job, returns its record; picklable for the process-based backends
OnRecord = Callable[[Record], None]


class Executor(Protocol):
    """Runs a bench's unfinished jobs and hands each record to ``on_record`` as soon as it finishes."""

    lead: bool  # whether this process writes the results log and prints (False on torchrun's ranks but 0)

    def prepare(self, setup: Callable[[], T]) -> T:
        """Run ``setup`` (data, the cached original model) in this process before any job; returns its value."""
        ...

    def run(self, jobs: Sequence[Job], run_job: RunJob, *, on_record: OnRecord) -> None:
        """Run every job with ``run_job``; a failed job raises after the records that finished were handed over."""
        ...


class InProcess:
    """Every job in this process, one after the other (the context is loaded once)."""

    lead = True

    def prepare(self, setup: Callable[[], T]) -> T:
        return setup()

    def run(self, jobs: Sequence[Job], run_job: RunJob, *, on_record: OnRecord) -> None:
        for job in jobs:
            on_record(run_job(job))


class ProcessPool(InProcess):
    """Jobs in ``workers`` spawned processes, each loading the data and the cached original model once.

    ``threads`` torch threads per worker (default: the machine's cores shared among the workers). One job, or one
    worker, runs in this process instead: starting a process would only add its start-up. With one worker, the
    set-up and the jobs in this process use ``threads`` threads when given (restored after).
    """

    def __init__(self, *, workers: int, threads: int | None = None) -> None:
        self.workers = workers
        self.threads = threads

    @contextmanager
    def _own_threads(self) -> Iterator[None]:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads or before)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def prepare(self, setup: Callable[[], T]) -> T:
        if self.workers > 1:
            return setup()
        with self._own_threads():
            return setup()

    def _run_here(self, jobs: Sequence[Job], run_job: RunJob, *, on_record: OnRecord) -> None:
        with self._own_threads():
            super().run(jobs, run_job, on_record=on_record)

    def run(self, jobs: Sequence[Job], run_job: RunJob, *, on_record: OnRecord) -> None:
        workers = min(self.workers, len(jobs))
        if workers <= 1:
            self._run_here(jobs, run_job, on_record=on_record)
            return
        threads = self.threads or max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=torch.set_num_threads,
            initargs=(threads,),
        ) as pool:
            pending: set[Future[Record]] = {pool.submit(run_job, job) for job in jobs}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        on_record(future.result())
            except BaseException:
                for future in pending:
                    future.cancel()
                raise

