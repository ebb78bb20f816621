"""What a task adapter must provide: the meaning of a batch for losses and for the task's metric."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader


class Task(abc.ABC):
    """Turns batches into per-sample losses and a metric; methods and the runner only talk to this interface."""

    name: ClassVar[str]
    metric: ClassVar[str]  # e.g. "accuracy" or "wer", reported in percent
    higher_is_better: ClassVar[bool]

    @abc.abstractmethod
    def per_sample_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Loss of each sample in the batch, shape ``[k]``; differentiable with respect to the model."""

    def mean_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss over the batch (what ordinary gradient descent differentiates)."""
        return self.per_sample_loss(model, batch).mean()

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader, *, device: torch.device) -> float:
        """The task metric on every batch of ``loader``, in percent."""

    @abc.abstractmethod
    def to_device(self, batch: Any, device: torch.device) -> Any:
        """Move a batch to ``device``."""

    def collate_fn(self) -> Any:
        """The DataLoader collate function for this task's datasets (None: PyTorch's default)."""
        return None
