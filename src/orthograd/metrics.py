"""Metrics the paper's tables use: accuracy and the Unlearning Impact Score (UIS)."""

from __future__ import annotations

from typing import Literal

import torch

Scenario = Literal["random", "class"]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return 100.0 * float((logits.argmax(dim=-1) == labels).float().mean())


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
