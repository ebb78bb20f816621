"""The ``ray`` backend (``RayTune``): one Ray Tune trial per job, records streamed back to the driver.

Each trial runs the experiment's job function (the very one the local backends run) and reports its record as a
JSON string; a Tune callback on the driver hands it to the engine, which appends it to ``RUN_DIR/results.jsonl`` the
moment the trial finishes, so an interrupted run keeps every finished trial and a rerun skips them by key. A failed
trial is reported after every other trial has finished; rerunning the command retries only the missing ones. Ray
is an optional extra (``pip install 'orthograd[ray]'``); this module is imported only when the backend is used.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray
import torch
from ray import tune

from orthograd.bench.executors import Job, OnNote, OnRecord, RunJob

T = TypeVar("T")

RECORD = "record_json"


@dataclass(frozen=True)
class TrialResources:
    """Resources Ray reserves for each trial; ``cpus`` also sets the trial's torch threads."""

    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if not self.cpus > 0:
            raise ValueError(f"cpus per trial must be > 0, got {self.cpus}")
        if self.gpus < 0:
            raise ValueError(f"gpus per trial must be >= 0, got {self.gpus}")


class TrialsFailed(RuntimeError):
    """Some trials raised; the finished ones are in the results log and a rerun retries only the others."""


def _trial(params: Mapping[str, Any], *, run_job: RunJob, jobs: list[Job], workdir: str, threads: int) -> None:
    """One job in a Ray worker: relative paths (cache, data) resolve as on the driver; the record goes to Tune."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(
            f"the driver's working folder {workdir} does not exist on this node: run `orthograd bench` from a folder "
            "that every node has (shared storage), so the config's relative paths mean the same everywhere"
        )
    os.chdir(workdir)
    torch.set_num_threads(threads)
    job = jobs[params["index"]]
    record = run_job(job)
    uis = record.get("uis")
    score = math.nan if uis is None else float(uis)
    tune.report({"uis": score, "key": job.key, RECORD: json.dumps(record, default=str)})


class _RecordWriter(tune.Callback):
    """Driver side: hand each finished trial's record to ``on_record`` (the bench appends it to its log)."""

    def __init__(self, on_record: OnRecord) -> None:
        self.on_record: OnRecord | None = on_record

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config into the experiment state; the hook (which may hold a terminal) is not state.
        return {"on_record": None}

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if RECORD in result and self.on_record is not None:
            self.on_record(json.loads(result[RECORD]))


def run_trials(
    jobs: Sequence[Job],
    run_job: RunJob,
    *,
    name: str,
    storage: Path,
    resources: TrialResources,
    on_record: OnRecord,
) -> None:
    """Run ``jobs`` as Ray Tune trials on the connected Ray cluster; raise ``TrialsFailed`` if any trial failed."""
    if not ray.is_initialized():
        raise RuntimeError("no Ray cluster is connected: call ray.init (RayTune does)")
    trainable = tune.with_parameters(
        _trial, run_job=run_job, jobs=list(jobs), workdir=os.getcwd(), threads=max(1, math.floor(resources.cpus))
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": resources.cpus, "gpu": resources.gpus}),
        param_space={"index": tune.grid_search(list(range(len(jobs))))},
        tune_config=tune.TuneConfig(reuse_actors=True),  # a worker keeps its data and original model across trials
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage.resolve()),
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[_RecordWriter(on_record)],
            verbose=0,
        ),
    )
    grid = tuner.fit()
    errors = [grid[i].error for i in range(len(grid)) if grid[i].error is not None]
    if errors:
        raise TrialsFailed(
            f"{len(errors)} of {len(jobs)} {name} trials failed (first: {errors[0]!r}); the finished ones are saved, "
            "rerun the same command to retry the rest"
        )


class RayTune:
    """Each job a Ray Tune trial, named after its phase, stored under ``storage``.

    It connects to Ray only when a phase has jobs to run (a fully resumed run starts nothing): to the cluster at
    ``address``, or to a local cluster of ``num_cpus`` CPUs that ``close`` shuts down again.
    """

    lead = True
    device: torch.device | None = None

    def __init__(
        self, *, storage: Path, resources: TrialResources, address: str | None = None, num_cpus: int | None = None
    ) -> None:
        self.storage = storage
        self.resources = resources
        self.address = address
        self.num_cpus = num_cpus
        self._started_ray = False

    def prepare(self, setup: Callable[[], T]) -> T:
        return setup()  # on the driver: the original model is trained and cached before any trial starts

    def run(self, jobs: Sequence[Job], run_job: RunJob, *, on_record: OnRecord) -> None:
        if not jobs:
            return
        self._connect()
        run_trials(jobs, run_job, name=getattr(jobs[0], "phase", "jobs"), storage=self.storage,
                   resources=self.resources, on_record=on_record)

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        if self.address is not None:
            ray.init(address=self.address, log_to_driver=False)
        else:
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False)
            self._started_ray = True

    def close(self) -> None:
        """Shut down the local Ray cluster this backend started (a cluster given by address is left running)."""
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


@contextmanager
def ray_tune(
    config: Any, *, run_dir: Path, on_note: OnNote, address: str | None = None, num_cpus: int | None = None,
    cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
) -> Iterator[RayTune]:
    """Ray Tune trials on the cluster at ``address`` (e.g. ``ray://head:10001`` or ``auto``), else on a local cluster
    of ``num_cpus`` CPUs started and shut down here; each trial reserves ``cpus_per_trial`` CPUs (also its torch
    threads) and ``gpus_per_trial`` GPUs. Trial state goes to ``RUN_DIR/ray``."""
    resources = TrialResources(cpus=cpus_per_trial, gpus=gpus_per_trial)
    trials = RayTune(storage=run_dir / "ray", resources=resources, address=address, num_cpus=num_cpus)
    try:
        yield trials
    finally:
        trials.close()
