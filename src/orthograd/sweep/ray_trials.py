"""Benchmark jobs as Ray Tune trials: one trial per job, records streamed back to the driver's results log.

Each trial runs ``bench.runner.execute`` (the very function ``orthograd bench`` runs) and reports its results record
as a JSON string; a Tune callback on the driver appends it to ``RUN_DIR/results.jsonl`` the moment the trial
finishes, so an interrupted sweep keeps every finished trial and a rerun skips them by key. A failed trial is
reported after every other trial has finished; rerunning the command retries only the missing ones.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from orthograd.bench.config import validate_config
from orthograd.bench.runner import Job, execute

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


def _trial(params: Mapping[str, Any], *, raw: dict[str, Any], jobs: list[Job], workdir: str, threads: int) -> None:
    """One job in a Ray worker: relative paths (cache, data) resolve as on the driver; the record goes to Tune."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(
            f"the driver's working folder {workdir} does not exist on this node: run `orthograd sweep` from a folder "
            "that every node has (shared storage), so the config's relative paths mean the same everywhere"
        )
    os.chdir(workdir)
    torch.set_num_threads(threads)
    job = jobs[params["index"]]
    record = execute(validate_config(raw), job)
    uis = record.get("uis")
    score = math.nan if uis is None else float(uis)
    tune.report({"uis": score, "key": job.key, RECORD: json.dumps(record, default=str)})


class _RecordWriter(tune.Callback):
    """Driver side: hand each finished trial's record to ``on_record`` (the bench appends it to its log)."""

    def __init__(self, on_record: Callable[[dict[str, Any]], None]) -> None:
        self.on_record: Callable[[dict[str, Any]], None] | None = on_record

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config into the experiment state; the hook (which may hold a terminal) is not state.
        return {"on_record": None}

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if RECORD in result and self.on_record is not None:
            self.on_record(json.loads(result[RECORD]))


def run_trials(
    raw: Mapping[str, Any],
    jobs: Sequence[Job],
    *,
    name: str,
    storage: Path,
    resources: TrialResources,
    on_record: Callable[[dict[str, Any]], None],
) -> None:
    """Run ``jobs`` as Ray Tune trials on the connected Ray cluster; raise ``TrialsFailed`` if any trial failed."""
    if not ray.is_initialized():
        raise RuntimeError("no Ray cluster is connected: call ray.init (orthograd.sweep.run_sweep does)")
    trainable = tune.with_parameters(
        _trial, raw=dict(raw), jobs=list(jobs), workdir=os.getcwd(), threads=max(1, math.floor(resources.cpus))
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
    errors = [result.error for result in grid if result.error is not None]
    if errors:
        raise TrialsFailed(
            f"{len(errors)} of {len(jobs)} {name} trials failed (first: {errors[0]!r}); the finished ones are saved, "
            "rerun the same command to retry the rest"
        )
