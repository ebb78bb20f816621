"""The one experiment engine: an ``Experiment`` plans jobs in phases, the engine runs the unfinished ones and logs them.

Every benchmark task is an ``Experiment`` (image classification: ``image_bench``; speaker unlearning:
``asr_bench``; language-model unlearning: ``llm_bench``). It plans its jobs as a generator of ``Phase``s, so a later
phase can read what an earlier one logged (a sweep's selection, a tuning split's chosen values); it runs one job into
a record, names the key that identifies a record in the log, describes a record in one console line and writes its
tables from the planned records. The engine does the rest the same way for every task: the run folder and its
``config.yaml``, the results log (``RUN_DIR/results.jsonl``: one fsynced line per record, so an interrupted run
resumes where it stopped and a finished job is never run twice), the executor that runs the jobs (``bench.executors``:
this process, worker processes, Ray Tune trials, torchrun's ranks), the progress callbacks, and each logged record's
format and provenance (commit, dirty tree, config hash: ``bench.provenance``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

from orthograd.bench.config import ConfigError
from orthograd.bench.executors import Executor, Job
from orthograd.bench.executors.local import InProcess
from orthograd.bench.provenance import run_provenance
from orthograd.bench.records import FORMAT, current_records
from orthograd.io import ResultsLog, atomic_write_text

Record = dict[str, Any]
OnStart = Callable[[str, int], None]
OnRun = Callable[[Record], None]
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class Phase:
    """Jobs that can run in any order (and in parallel); the next phase is planned once they are logged."""

    name: str
    jobs: Sequence[Job]


class NotFinished(KeyError):
    """A planner asked for the record of a job the log does not hold yet (a later phase needs an earlier one's)."""


class FinishedRuns:
    """The records of a results log by key, as an experiment's planner reads them between phases."""

    def __init__(self, log: ResultsLog, record_key: Callable[[Mapping[str, Any]], str]) -> None:
        self._log = log
        self._record_key = record_key
        self._records: dict[str, Record] = {}
        self.refresh()

    def refresh(self) -> None:
        """Read the log again (another process, rank 0 under torchrun, may have appended to it); a log in an older
        format is an error naming ``orthograd upgrade-log``."""
        self._records = {self._record_key(r): r for r in current_records(self._log.path)}

    def add(self, record: Record) -> None:
        self._records[self._record_key(record)] = record

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __getitem__(self, key: str) -> Record:
        if key not in self._records:
            raise NotFinished(key)
        return self._records[key]

    def get(self, key: str) -> Record | None:
        return self._records.get(key)


class Experiment(Protocol):
    """What a benchmark task gives the engine. Its jobs are ``bench.jobs.Job``s. Instances are pickled to worker
    processes: keep heavy state (data, models) in a ``bench.jobs.ProcessCache`` that ``setup`` fills, not on the
    instance. A task whose jobs torchrun's ranks can
    run together adds ``data_parallel(device) -> Experiment`` (the ``ddp`` backend asks for it)."""

    def setup(self) -> None:
        """Load the data and the original model (trained and cached on first use) in this process."""
        ...

    def plan(self, finished: FinishedRuns) -> Iterator[Phase]:
        """The jobs, phase by phase; ``finished`` holds every logged record when a phase is planned."""
        ...

    def run_job(self, job: Any) -> Record:
        """Run one job and return its record (picklable: process-based executors call it in workers)."""
        ...

    def record_key(self, record: Mapping[str, Any]) -> str:
        """The key of a logged record (the ``key`` of the job that made it)."""
        ...

    def describe(self, record: Mapping[str, Any]) -> str:
        """One console line about a finished record."""
        ...

    def write_tables(self, records: Sequence[Mapping[str, Any]], out_dir: Path) -> Path | None:
        """Tables (and plots) of the planned records, written into the run folder; returns the Markdown file that
        holds the tables (None when there are none yet)."""
        ...


def data_parallel(experiment: Experiment, device: torch.device) -> Experiment:
    """The experiment whose jobs torchrun's ranks run together on ``device`` (its ``data_parallel(device)``), or an
    error when its task has no data-parallel runs."""
    make = getattr(experiment, "data_parallel", None)
    if make is None:
        raise ConfigError(f"{type(experiment).__name__} has no data-parallel runs: use --backend local, processes "
                          "or ray")
    return make(device)


class Engine:
    """An experiment bound to a run folder and an executor (default: jobs one after the other in this process)."""

    def __init__(
        self,
        experiment: Experiment,
        *,
        out_dir: str | Path,
        raw: Mapping[str, Any] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.executor = executor or InProcess()
        device = self.executor.device
        self.experiment = experiment if device is None else data_parallel(experiment, device)
        self.out = Path(out_dir)
        self.raw = dict(raw) if raw is not None else None
        self.log = ResultsLog(self.out / RESULTS_FILE)
        self.tables: Path | None = None  # the Markdown tables the last run wrote

    def run(self, *, on_start: OnStart | None = None, on_run: OnRun | None = None) -> list[Record]:
        """Run every unfinished job, phase by phase; write the tables; return the planned records in plan order.

        ``on_start(phase, todo)`` and ``on_run(record)`` are called in the process that writes the log only.
        """
        lead = self.executor.lead
        if lead:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.raw is not None:
                atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.raw, sort_keys=False))
        self.executor.prepare(self.experiment.setup)
        finished = FinishedRuns(self.log, self.experiment.record_key)
        planned: list[str] = []
        provenance = run_provenance(self.raw) if lead else {}

        def finish(record: Record) -> None:
            if lead:
                record = {**record, "format": FORMAT, "provenance": provenance}
                self.log.append(record)
                finished.add(record)
                if on_run is not None:
                    on_run(record)

        for phase in self.experiment.plan(finished):
            planned += [job.key for job in phase.jobs]
            todo = [job for job in phase.jobs if job.key not in finished]
            if on_start is not None and lead:
                on_start(phase.name, len(todo))
            self.executor.run(todo, self.experiment.run_job, on_record=finish)
            finished.refresh()  # records as the log holds them (JSON), also those another rank wrote
        records = [finished[key] for key in dict.fromkeys(planned) if key in finished]
        if lead:
            self.tables = self.experiment.write_tables(records, self.out)
        return records
