"""``evaluate()``: a model's task metric on any dataset or DataLoader, outside an unlearning run.

The same task adapters ``unlearn()`` uses compute it, so a number printed here is the number a history row shows.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from orthograd.input_checks import check_model
from orthograd.runtime import resolve_device
from orthograd.tasks import Task, get_task

EVAL_BATCH_SIZE = 512


def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    task: str | Task = "classification",
    device: str | torch.device | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
) -> dict[str, float]:
    """The task's metric of ``model`` on ``data`` in percent, keyed by name: ``{"accuracy": 97.8}``, ``{"wer": 12.5}``.

    ``device`` defaults to the one the model's parameters are on; with another, the model is moved there for the
    evaluation and back afterwards. The model's train/eval mode is restored too. ``batch_size`` applies to a
    dataset (a DataLoader is used as given). Token sequences are padded with the model's ``config.pad_token_id``
    (see ``ClassificationTask``).
    """
    check_model(model)
    adapter = get_task(task).for_model(model)
    home = model_device(model)
    run_device = resolve_device(device) if device is not None else home
    loader = data if isinstance(data, DataLoader) else DataLoader(
        data, batch_size=batch_size, shuffle=False, collate_fn=adapter.collate_fn()
    )
    model.to(run_device)
    try:
        return {adapter.metric: adapter.evaluate(model, loader, device=run_device)}
    finally:
        model.to(home)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
