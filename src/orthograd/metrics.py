"""Metrics the paper's tables use: accuracy and the Unlearning Impact Score (UIS)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from orthograd.evaluation import evaluate

Scenario = Literal["random", "class"]


def accuracy(
    logits_or_model: torch.Tensor | nn.Module,
    labels_or_data: torch.Tensor | Dataset | DataLoader,
    *,
    device: str | torch.device | None = None,
) -> float:
    """Top-1 accuracy in percent: of ``logits`` against ``labels``, or of a model on a dataset or DataLoader.

    ``accuracy(model, test)`` is ``orthograd.evaluate(model, test)["accuracy"]`` (``device`` as there).
    """
    if isinstance(logits_or_model, nn.Module):
        if isinstance(labels_or_data, torch.Tensor):
            raise TypeError("accuracy(model, data) takes a dataset or DataLoader, not a tensor: pass (logits, labels)"
                            " tensors, or wrap the inputs in a TensorDataset")
        return evaluate(logits_or_model, labels_or_data, task="classification", device=device)["accuracy"]
    if not isinstance(logits_or_model, torch.Tensor) or not isinstance(labels_or_data, torch.Tensor):
        raise TypeError(
            "accuracy takes (logits, labels) tensors or (model, dataset or DataLoader), got "
            f"({type(logits_or_model).__name__}, {type(labels_or_data).__name__})"
        )
    if labels_or_data.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return 100.0 * float((logits_or_model.argmax(dim=-1) == labels_or_data).float().mean())


def unlearning_target(*, scenario: Scenario, original_test: float) -> float:
    """What the forget metric should reach: the original test accuracy (random) or 0 (class forgetting)."""
    if scenario == "random":
        return original_test
    if scenario == "class":
        return 0.0
    raise ValueError(f"scenario must be 'random' or 'class', got {scenario!r}")


def uis(*, original_test: float, unlearned_test: float, unlearned_forget: float, scenario: Scenario) -> float:
    """Unlearning Impact Score (lower is better).

    UIS = ( |A_test^p - A_test^u| / A_test^p + |target - A_u^u| / A_test^p ) / 2, with target = A_test^p for
    random forgetting and 0 for class forgetting (p: original model, u: unlearned model). Accuracies may be
    given in percent or as fractions, as long as all three use the same unit.
    """
    if original_test <= 0:
        raise ValueError("UIS needs a positive original test accuracy")
    target = unlearning_target(scenario=scenario, original_test=original_test)
    test_change = abs(original_test - unlearned_test) / original_test
    forget_gap = abs(target - unlearned_forget) / original_test
    return (test_change + forget_gap) / 2.0
