"""An image config's test runs as data-parallel runs: ``torchrun ... orthograd bench CONFIG.yaml --backend ddp``.

The engine's torchrun backend (``DataParallel``): every rank runs the same ``bench.image.ImageExperiment`` over the
same jobs, and each job is ``unlearn_distributed`` across the ranks. Rank 0 trains (or loads) the cached original
model first and the other ranks load it from the cache after a barrier; rank 0 alone appends each record to
``RUN_DIR/results.jsonl`` under the same key ``orthograd bench`` uses, so ``orthograd report RUN_DIR`` works and a
rerun skips finished runs. Not done here (the local and Ray backends do them): the sweep phase, the retrained
reference and the privacy metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from orthograd.image_bench.config import BenchConfig
from orthograd.bench.executors import OnRecord, RunJob
from orthograd.image_bench.jobs import Job
from orthograd.bench.engine import OnRun, OnStart
from orthograd.image_bench.experiment import JobInputs, run_bench
from orthograd.distributed.collectives import world
from orthograd.distributed.runner import unlearn_distributed

T = TypeVar("T")


class DataParallel:
    """The bench's torchrun backend: every rank runs every job together; rank 0 writes the log and prints."""

    def __init__(self) -> None:
        self.lead = world()[0] == 0

    def prepare(self, setup: Callable[[], T]) -> T:
        """Rank 0 first (it trains and caches the original model), then the others (they load it)."""
        if self.lead:
            value = setup()
            dist.barrier()
            return value
        dist.barrier()
        return setup()

    def run(self, jobs: Sequence[Job], run_job: RunJob, *, on_record: OnRecord) -> None:
        dist.barrier()  # every rank has read the results log before rank 0 appends to it
        for job in jobs:
            on_record(run_job(job))
        dist.barrier()  # rank 0 has appended every record before any rank reads the log again


def execute_data_parallel(config: BenchConfig, job: Job, *, device: torch.device) -> dict[str, Any]:
    """Run one test job as ``unlearn_distributed`` on this rank's ``device``; returns its record (on every rank)."""
    inputs = JobInputs.of(config, job)
    result = unlearn_distributed(inputs.ctx.original, inputs.forget, inputs.retain, test=inputs.ctx.data.test,
                                 **inputs.unlearn_options(device=device))
    return inputs.record(result, device=device, world_size=world()[1])


def run_bench_distributed(
    config: BenchConfig,
    raw: Mapping[str, Any],
    *,
    out_dir: str | Path,
    device: torch.device,
    method_names: Sequence[str] | None = None,
    on_start: OnStart | None = None,
    on_run: OnRun | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the config's test runs on every rank of the initialised process group; returns the records.

    Call on every rank with the same config; ``device`` is this rank's (``init_process_group_from_env``).
    ``method_names`` restricts the run to some of the config's methods. ``on_start`` and ``on_run`` are called on
    rank 0 only. The keys are the bench's: neither the sweep, the retrained reference nor the other methods enter them.
    """
    unknown = sorted(set(method_names or ()) - set(config.methods))
    if unknown:
        raise ValueError(f"methods {unknown} are not in the config's methods {sorted(config.methods)}")
    chosen = {m: h for m, h in config.methods.items() if method_names is None or m in method_names}
    test_only = config.model_copy(
        update={"methods": chosen, "sweep": None, "scenario": config.scenario.model_copy(update={"retrain": False})}
    )
    return run_bench(test_only, raw, out_dir=out_dir, executor=DataParallel(),
                     run_job=partial(execute_data_parallel, device=device), on_start=on_start, on_run=on_run)
