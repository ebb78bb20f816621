"""``train_classifier()``: plain supervised training, to get the 'original' model that unlearning starts from.

The demo and the benchmarks train their original models (and retrained references) with it, so a model a user
trains here is trained the way the shipped tables' models were.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from orthograd.input_checks import check_model
from orthograd.runtime import resolve_device, seeded_generator
from orthograd.tasks import get_task


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

    ``data`` is a dataset (shuffled with a generator seeded by ``seed``, in batches of ``batch_size``) or a
    DataLoader used as given. ``optimizer`` is Adam or SGD (with ``momentum``); ``device`` defaults to CUDA when
    available, and the model stays there.
    """
    check_model(model)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    task = get_task("classification")
    run_device = resolve_device(device)
    generator = seeded_generator(seed)
    model.to(run_device).train()
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loader = data if isinstance(data, DataLoader) else DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=generator,
        collate_fn=task.collate_fn(),
    )
    for _ in range(epochs):
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            task.mean_loss(model, task.to_device(batch, run_device)).backward()
            opt.step()
    return model.eval()
