"""The ``ddp`` backend (``DataParallel``): torchrun's ranks run each job together, ``torchrun ... orthograd bench
CONFIG.yaml --backend ddp``.

Every rank plans the same jobs; the engine hands the experiment this backend's ``device`` and the experiment runs
each job across the ranks (``Experiment.data_parallel``: every task's unlearning runs as ``unlearn_distributed``).
The ranks run on GPUs when CUDA is available, unless the config asks for the CPU (an image config's ``device``, a
speech or language-model config's ``model.device``).
Rank 0 runs the set-up first (it trains and caches the original model), the other ranks then load it from the
cache; rank 0 alone appends each record to ``RUN_DIR/results.jsonl`` and prints, so a rerun skips finished runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from orthograd.bench.executors import Job, OnNote, OnRecord, RunJob
from orthograd.distributed.collectives import world
from orthograd.distributed.runner import init_process_group_from_env
from orthograd.runtime import resolve_device

T = TypeVar("T")


class DataParallel:
    """Every rank runs every job together on its ``device``; rank 0 writes the log and prints."""

    def __init__(self, *, device: torch.device) -> None:
        self.device: torch.device | None = device
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
            on_record(self.tagged(run_job(job)))
        dist.barrier()  # rank 0 has appended every record before any rank reads the log again

    @staticmethod
    def tagged(record: dict[str, Any]) -> dict[str, Any]:
        """A run's record with the number of ranks that made it (``world_size``); a record that only measures a
        model (no ``steps``) is unchanged."""
        return record if record.get("steps") is None else {**record, "world_size": world()[1]}


def device_kind(config: Any) -> str:
    """What the config asks its ranks to run on, as ``init_process_group_from_env`` takes it: "cpu", "cuda" (each
    rank on its own GPU, whatever index the config names) or "auto", from an image config's ``device`` or a speech
    or language-model config's ``model.device`` (None: "auto")."""
    setting = getattr(config, "device", None) or getattr(getattr(config, "model", None), "device", None)
    if setting is None or setting == "auto":
        return "auto"
    return resolve_device(setting).type


@contextmanager
def torchrun(config: Any, *, run_dir: Path, on_note: OnNote) -> Iterator[DataParallel]:
    """Join torchrun's process group on the config's device (a GPU per rank when available), run, leave it."""
    device = init_process_group_from_env(device=device_kind(config))
    try:
        if dist.get_rank() == 0:
            on_note(f"{dist.get_world_size()} ranks ({dist.get_backend()}), rank 0 on {device}; results: {run_dir}")
        yield DataParallel(device=device)
    finally:
        dist.destroy_process_group()
