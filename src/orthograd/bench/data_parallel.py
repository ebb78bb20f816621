"""What a task's experiment needs to run its jobs on torchrun's ranks together (the ``ddp`` backend).

Each unlearning run is one ``unlearn_distributed`` call on every rank (``unlearn_on_ranks``: the benchmark's
``bench_unlearn`` over the process group), and the task's models and evaluations live on the rank's own device
(``on_rank_device``). Everything else of a job (measuring the original model, the scores after a run) runs whole on
every rank, on the same model: correct, not faster. The engine logs rank 0's record; the executor adds the number of
ranks to a run's record (``executors.torchrun``).
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from pydantic import BaseModel

from orthograd.bench.protocol import as_benchmark_run
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

