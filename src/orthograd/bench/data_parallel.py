"""What a task's experiment needs to run its jobs on torchrun's ranks together (the ``ddp`` backend).

Each unlearning run is one ``unlearn_distributed`` call on every rank (``unlearn_on_ranks``: the benchmark's
``bench_unlearn`` over the process group), the task's models and evaluations live on the rank's own device
(``on_rank_device``), and the record of a run says over how many ranks it ran (``with_world_size``). Everything
else of a job (measuring the original model, the scores after a run) runs whole on every rank, on the same model:
correct, not faster; the engine logs rank 0's record.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from pydantic import BaseModel

from orthograd.bench.protocol import as_benchmark_run
from orthograd.distributed.collectives import world
from orthograd.distributed.runner import unlearn_distributed
from orthograd.results import UnlearnResult

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def unlearn_on_ranks(*args: Any, **kwargs: Any) -> UnlearnResult:
    """``bench_unlearn`` as one data-parallel run over the ranks of the default process group: call it on every
    rank with the same arguments; every rank returns the same unlearned model and history."""
    return as_benchmark_run(unlearn_distributed, *args, **kwargs)


def on_rank_device(config: ConfigT, device: torch.device) -> ConfigT:
    """``config`` with ``model.device`` set to this rank's ``device`` (a task config whose models and evaluations
    run where ``model.device`` says). The device is no part of a record's key, so the records resume either way."""
    model = getattr(config, "model", None)
    if not isinstance(model, BaseModel) or "device" not in type(model).model_fields:
        raise TypeError(f"{type(config).__name__} has no model.device to place this rank's runs on")
    return config.model_copy(update={"model": model.model_copy(update={"device": str(device)})})


def with_world_size(record: dict[str, Any]) -> dict[str, Any]:
    """A run's record with the number of ranks that made it (``world_size``); a record that only measures a model
    (no ``steps``) is unchanged."""
    if record.get("steps") is None:
        return record
    return {**record, "world_size": world()[1]}
