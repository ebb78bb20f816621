"""Classification: batches are ``(inputs, labels)``, the loss is cross-entropy and the metric accuracy."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from orthograd.tasks.base import Task


class ClassificationTask(Task):
    """Cross-entropy per sample; accuracy in percent."""

    name: ClassVar[str] = "classification"
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True

    def logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, _ = batch
        return model(inputs)

    def targets(self, batch: Any) -> torch.Tensor:
        return batch[1]

    def replace_targets(self, batch: Any, targets: torch.Tensor) -> Any:
        return batch[0], targets

    def mean_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), self.targets(batch))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, *, device: torch.device) -> float:
        was_training = model.training
        model.eval()
        correct = total = 0
        try:
            for batch in loader:
                inputs, labels = self.to_device(batch, device)
                correct += int((model(inputs).argmax(dim=1) == labels).sum())
                total += int(labels.numel())
        finally:
            model.train(was_training)
        if total == 0:
            raise ValueError("cannot evaluate accuracy on an empty set")
        return 100.0 * correct / total

    def validate(self, model: nn.Module, *, sets: dict[str, Any], forget_classes: tuple[int, ...], device: torch.device) -> None:
        """Labels must be class indices the model outputs; a class to forget must occur in the forget set."""
        from orthograd.data.splits import labels_of

        num_classes = int(self.first_logits(model, sets["forget"], device=device).shape[-1])
        for name, dataset in sets.items():
            labels = labels_of(dataset)
            bad = labels[(labels < 0) | (labels >= num_classes)]
            if bad.size:
                raise ValueError(
                    f"the {name} set has labels {sorted(set(bad.tolist()))[:5]} outside the model's "
                    f"{num_classes} outputs (valid: 0..{num_classes - 1}); remap the labels or use the matching model"
                )
        forget_labels = set(labels_of(sets["forget"]).tolist())
        absent = [c for c in forget_classes if c not in forget_labels]
        if absent:
            raise ValueError(
                f"forget_classes {absent} do not occur in the forget set (its classes: {sorted(forget_labels)[:10]}); "
                "build the forget set with orthograd.data.class_forgetting_split or fix forget_classes"
            )

    def to_device(self, batch: Any, device: torch.device) -> Any:
        inputs, labels = batch
        return inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
