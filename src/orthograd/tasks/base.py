"""What a task adapter must provide: the meaning of a batch for losses and for the task's metric.

A custom task subclasses ``Task`` and implements ``logits``, ``targets``, ``replace_targets``, ``evaluate`` and
``to_device``; it overrides ``per_sample_loss`` when its loss is not cross-entropy on ``logits``, and ``validate`` /
``collate_fn`` when its data needs checks or padding. ``per_sample_loss`` must give each sample's loss from that
sample alone: the per-sample gradient engines differentiate it sample by sample. Register it with
``orthograd.tasks.register_task`` to select it by name. docs/custom_task.md has the table and a worked example.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every token of ``[B, T, V]`` logits against ``[B, T]`` targets, 0 where ignored."""
    return F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=IGNORE_INDEX
    ).view_as(targets)


def per_sample_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample; for ``[B, T, V]`` logits the mean over each sample's non-ignored tokens."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)
    token_losses = token_cross_entropy(logits, targets)
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp_min(1)
    return token_losses.sum(dim=1) / counts


class Task(abc.ABC):
    """Turns batches into per-sample losses and a metric; methods and the runner only talk to this interface."""

    name: ClassVar[str]
    metric: str  # e.g. "accuracy" or "wer", reported in percent (a class attribute, or set per instance)
    higher_is_better: ClassVar[bool]
    lora_mlp: ClassVar[bool] = False  # default LoRA targets include the transformer blocks' MLP projections

    @abc.abstractmethod
    def logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Unnormalised scores: ``[B, C]`` for classification, ``[B, T, V]`` for sequences (teacher forced)."""

    @abc.abstractmethod
    def targets(self, batch: Any) -> torch.Tensor:
        """Gold labels aligned with ``logits``: ``[B]`` or ``[B, T]`` with ``IGNORE_INDEX`` at padding."""

    @abc.abstractmethod
    def replace_targets(self, batch: Any, targets: torch.Tensor) -> Any:
        """The same batch with other labels (e.g. sampled ones, for a Monte-Carlo Fisher)."""

    def per_sample_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Cross-entropy of each sample, shape ``[k]`` (sequences: mean over the sample's labelled tokens)."""
        return per_sample_cross_entropy(self.logits(model, batch), self.targets(batch))

    def per_sample_nll(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Negative log-likelihood of each sample's whole target, ``[k]``: -log p(y | x), summed over its tokens.

        Equal to ``per_sample_loss`` for one label per sample; for sequences it is the sum, not the mean, over
        the labelled tokens (what preference-style losses such as NPO compare between two models).
        """
        logits, targets = self.logits(model, batch), self.targets(batch)
        if logits.dim() == 2:
            return per_sample_cross_entropy(logits, targets)
        return token_cross_entropy(logits, targets).sum(dim=1)

    def mean_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss over the batch (what ordinary gradient descent differentiates)."""
        return self.per_sample_loss(model, batch).mean()

    def mean_is_mean_of_per_sample(self, batch: Any) -> bool:
        """Whether ``mean_loss`` on ``batch`` is the mean of ``per_sample_loss`` (what a fused forget + retain pass
        averages): true for this base definition; a task that overrides ``mean_loss`` says when it still holds."""
        return type(self).mean_loss is Task.mean_loss

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device) -> float:
        """The task metric on every batch of ``loader``, in percent."""

    @abc.abstractmethod
    def to_device(self, batch: Any, device: torch.device) -> Any:
        """Move a batch to ``device``."""

    def validate(
        self, model: nn.Module, *, sets: dict[str, Any], forget_classes: tuple[int, ...], device: torch.device
    ) -> None:
        """Check before a run that the model can process the data (a clear error instead of a crash mid-run).

        ``sets`` maps "forget", "retain" and optionally "test" to datasets. The default runs the model on one
        forget sample; tasks add their own checks (e.g. label ranges).
        """
        self.first_logits(model, sets["forget"], device=device)

    @torch.no_grad()
    def first_logits(self, model: nn.Module, dataset: Any, *, device: torch.device) -> torch.Tensor:
        """Logits of the first sample of ``dataset``; a model that cannot take the input gets a clear error."""
        batch = self.to_device(next(iter(DataLoader(dataset, batch_size=1, collate_fn=self.collate_fn()))), device)
        was_training = model.training
        model.eval()
        try:
            return self.logits(model, batch)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(
                f"{type(model).__name__} could not process a sample of the data ({type(exc).__name__}: {exc}). "
                "Check that the inputs have the shape and dtype the model was trained on."
            ) from exc
        finally:
            model.train(was_training)

    def collate_fn(self) -> Any:
        """The DataLoader collate function for this task's datasets (None: PyTorch's default)."""
        return None

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics this task's evaluations produce (stop rules are matched against them): ``(metric,)``."""
        return (self.metric,)

    def for_model(self, model: nn.Module) -> Task:
        """This task as it applies to ``model`` (e.g. padding with the model's pad token id); itself by default."""
        return self

    def classes_of(self, dataset: Any) -> set[int] | None:
        """The class labels in ``dataset`` (None: the task has no classes); what infers ``stop="class"``."""
        return None
