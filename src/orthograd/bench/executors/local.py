"""The local backends: ``local`` (this process, or the config's ``workers`` processes) and ``processes``.

``InProcess`` runs every job here, one after the other; ``ProcessPool`` runs them in spawned worker processes, each
loading the data and the cached original model once.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch

from orthograd.bench.executors import Executor, Job, OnNote, OnRecord, Record, RunJob

T = TypeVar("T")


class InProcess:
    """Every job in this process, one after the other (the context is loaded once)."""

    lead = True
    device: torch.device | None = None

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



def local(config: Any, *, run_dir: Path, on_note: OnNote) -> AbstractContextManager[Executor]:
    """The config's ``workers`` processes with ``threads_per_worker`` torch threads each (1 worker: this process)."""
    return nullcontext(ProcessPool(workers=config.workers, threads=config.threads_per_worker))


def processes(
    config: Any, *, run_dir: Path, on_note: OnNote, num_cpus: int | None = None, cpus_per_trial: float | None = None,
) -> AbstractContextManager[Executor]:
    """``num_cpus`` worker processes (default: the machine's cores), each with ``cpus_per_trial`` torch threads
    (default: the config's ``threads_per_worker``, else the cores shared among the workers)."""
    threads = int(cpus_per_trial) if cpus_per_trial is not None else config.threads_per_worker
    return nullcontext(ProcessPool(workers=num_cpus or os.cpu_count() or 1, threads=threads))
