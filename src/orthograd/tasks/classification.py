"""Classification: batches are ``(inputs, labels)`` pairs or Hugging Face style dicts; cross-entropy and accuracy.

Dict batches pass their fields (all but ``labels``) to the model as keyword arguments; a model may return logits
or a ``ModelOutput`` (its ``logits``). Labels of -100 are ignored, as in transformers.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from orthograd.data.splits import labels_of
from orthograd.tasks import batches
from orthograd.tasks.base import IGNORE_INDEX, Task


class ClassificationTask(Task):
    """Cross-entropy per sample; accuracy in percent over the samples whose label is not -100.

    Token sequences of unequal length in dict samples are right-padded (the collate function adds the attention
    mask) with the model's ``config.pad_token_id`` (models that locate the last token by it, GPT-2's classifier,
    score wrongly with another), else ``tokenizer.pad_token_id``, else ``pad_token_id``, else 0; settings that
    disagree are an error naming them (see ``for_model``).
    """

    name: ClassVar[str] = "classification"
    metric: str = "accuracy"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, *, pad_token_id: int | None = None, tokenizer: Any = None) -> None:
        self.pad_token_id = pad_token_id
        self.tokenizer = tokenizer

    def for_model(self, model: nn.Module) -> ClassificationTask:
        """A copy that pads with ``model``'s pad token id (its config's, then the tokenizer's, then this task's)."""
        resolved = copy.copy(self)
        resolved.pad_token_id = batches.resolve_pad_token_id(
            model, given=self.pad_token_id, tokenizer=self.tokenizer, task=type(self).__name__
        )
        return resolved

    def classes_of(self, dataset: Any) -> set[int]:
        return {int(c) for c in np.unique(_labels(dataset))} - {IGNORE_INDEX}

    def logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, _ = batches.split_batch(batch)
        return batches.call_model(model, inputs)

    def targets(self, batch: Any) -> torch.Tensor:
        return batches.split_batch(batch)[1]

    def replace_targets(self, batch: Any, targets: torch.Tensor) -> Any:
        return batches.with_labels(batch, targets)

    def mean_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), self.targets(batch), ignore_index=IGNORE_INDEX)

    def mean_is_mean_of_per_sample(self, batch: Any) -> bool:
        """Cross-entropy's mean is over the labels not ignored: the per-sample mean when no label is ignored (and
        ``mean_loss`` is this one)."""
        this_mean = type(self).mean_loss is ClassificationTask.mean_loss
        return this_mean and not bool((self.targets(batch) == IGNORE_INDEX).any())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device) -> float:
        was_training = model.training
        model.eval()
        correct = total = 0
        try:
            for batch in loader:
                batch = self.to_device(batch, device)
                labels = self.targets(batch)
                kept = labels != IGNORE_INDEX
                correct += int(((self.logits(model, batch).argmax(dim=-1) == labels) & kept).sum())
                total += int(kept.sum())
        finally:
            model.train(was_training)
        if total == 0:
            raise ValueError("cannot evaluate accuracy on an empty set")
        return 100.0 * correct / total

    def validate(
        self, model: nn.Module, *, sets: dict[str, Any], forget_classes: tuple[int, ...], device: torch.device
    ) -> None:
        """Labels must be class indices the model outputs; a class to forget must occur in the forget set."""
        logits = self.first_logits(model, sets["forget"], device=device)
        if logits.dim() != 2:
            raise ValueError(
                f"task='classification' expects logits of shape [batch, classes]; the model gave {list(logits.shape)} "
                "(for a language model use task='causal_lm')"
            )
        num_classes = int(logits.shape[-1])
        for name, dataset in sets.items():
            _check_label_format(name, dataset)
            labels = _labels(dataset)
            bad = labels[((labels < 0) | (labels >= num_classes)) & (labels != IGNORE_INDEX)]
            if bad.size:
                raise ValueError(
                    f"the {name} set has labels {sorted(set(bad.tolist()))[:5]} outside the model's "
                    f"{num_classes} outputs (valid: 0..{num_classes - 1}); remap the labels or use the matching model"
                )
        forget_labels = set(_labels(sets["forget"]).tolist())
        absent = [c for c in forget_classes if c not in forget_labels]
        if absent:
            raise ValueError(
                f"forget_classes {absent} do not occur in the forget set (its classes: {sorted(forget_labels)[:10]}); "
                "build the forget set with orthograd.data.class_forgetting_split or fix forget_classes"
            )

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return batches.to_device(batch, device)

    def collate_fn(self) -> Any:
        return functools.partial(batches.pad_collate, pad_token_id=self.pad_token_id or 0)


def _check_label_format(name: str, dataset: Dataset[Any]) -> None:
    """The first sample's label must be one integer class id (one-hot, list-wrapped and float labels are refused)."""
    first = dataset[0]
    label = first[batches.label_key(first)] if isinstance(first, Mapping) else batches.split_batch(first)[1]
    value = label if isinstance(label, torch.Tensor) else np.asarray(label)
    shape = tuple(value.shape)
    problem = None
    if len(shape) >= 1 and int(np.prod(shape)) == 1:
        problem = f"lists of one id (e.g. {label!r}): unwrap them (label[0], or .squeeze(-1) on a label tensor)"
    elif len(shape) == 1:
        problem = f"one-hot or score vectors of length {shape[0]}: use .argmax(-1)"
    elif len(shape) > 1:
        problem = f"label arrays of shape {list(shape)}: give one class id per sample"
    elif not _is_integer(value):
        problem = f"floating-point labels (e.g. {float(value)}): use .long() or int()"
    if problem is not None:
        raise ValueError(f"labels must be integer class ids; the {name} set has {problem}")


def _is_integer(value: torch.Tensor | np.ndarray) -> bool:
    if isinstance(value, torch.Tensor):
        return not (value.is_floating_point() or value.is_complex())
    return value.dtype.kind in "iub"


def _labels(dataset: Dataset[Any]) -> np.ndarray:
    """Integer labels of a dataset of ``(input, label)`` pairs or of dicts with ``labels``."""
    first = dataset[0]
    if not isinstance(first, Mapping):
        batches.split_batch(first)  # a sample of another shape: the error says what was expected
        return labels_of(dataset)
    key = batches.label_key(first)
    labels = [dataset[i][key] for i in range(batches.dataset_size(dataset))]
    return np.asarray([int(label) for label in labels])
