"""Plain supervised training, to get the 'original' model that unlearning starts from (and retrained references).

``train_model`` is the one training loop of the library: every benchmark task (images, speech, language models),
the demo and the test fixtures train their models with it, so a model a user trains here is trained the way the
shipped tables' models were. ``train_classifier`` is its image-classification form.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from orthograd.input_checks import check_model
from orthograd.runtime import resolve_device, seeded_generator
from orthograd.tasks import Task, get_task

log = logging.getLogger(__name__)
Optimizer = Literal["adam", "adamw", "sgd"]


def train_model(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    task: str | Task = "classification",
    epochs: int | None = None,
    steps: int | None = None,
    lr: float = 3e-3,
    batch_size: int = 64,
    optimizer: Optimizer = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    log_every: int | None = None,
) -> nn.Module:
    """Train every parameter of ``model`` in place on the task's mean loss; return it in eval mode.

    Runs ``epochs`` passes over ``data``, or ``steps`` batches (passes repeated as needed): exactly one of the two.
    ``data`` is a dataset (shuffled with a generator seeded by ``seed``, in batches of ``batch_size``, collated by the
    task) or a DataLoader used as given. ``optimizer``: Adam, AdamW or SGD with ``momentum``, each with
    ``weight_decay``. The global generator (dropout, initialisation) is left as the caller set it. ``log_every``
    logs the loss every that many steps. ``device`` defaults to CUDA when available, and the model stays there.
    """
    check_model(model)
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs (passes over the data) or steps (batches)")
    for name, count in (("epochs", epochs), ("steps", steps)):
        if count is not None and count < 0:
            raise ValueError(f"{name} must be >= 0, got {count}")
    if optimizer not in ("adam", "adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {optimizer!r}")
    task = get_task(task)
    run_device = resolve_device(device)
    model.to(run_device).train()
    opt = _optimizer(model, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    loader = data if isinstance(data, DataLoader) else DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=seeded_generator(seed), collate_fn=task.collate_fn(),
    )
    total = steps if steps is not None else (epochs or 0) * len(loader)
    step, started = 0, time.perf_counter()
    while step < total:
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            loss = task.mean_loss(model, task.to_device(batch, run_device))
            loss.backward()
            opt.step()
            step += 1
            if log_every and (step % log_every == 0 or step == total):
                log.info("training: step %d/%d loss %.3f (%.0f s)", step, total, float(loss.detach()),
                         time.perf_counter() - started)
            if step == total:
                break
    return model.eval()


def _optimizer(
    model: nn.Module, name: Optimizer, *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_classifier(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 64,
    optimizer: Literal["adam", "sgd"] = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Train ``model`` in place with cross-entropy on ``(inputs, labels)`` batches; return it in eval mode.

    ``train_model`` with the classification task and ``epochs`` passes: ``data`` is a dataset (shuffled with a
    generator seeded by ``seed``) or a DataLoader used as given; Adam or SGD (with ``momentum``); ``device``
    defaults to CUDA when available, and the model stays there.
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    return train_model(model, data, task="classification", epochs=epochs, lr=lr, batch_size=batch_size,
                       optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, seed=seed, device=device)
