"""Forget/retain splits of a training set for random-sample and class forgetting, with a limited retain set.

The paper's low-data regime: the retain set is a small random subset of the training data that is not
forgotten (5K of CIFAR-10, 10K of ImageNet), never the whole remainder unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from orthograd.input_checks import base_and_indices


@dataclass(frozen=True)
class UnlearningSplit:
    """Indices into a training set: what to forget and the (disjoint) retain subset that may be used."""

    forget: np.ndarray
    retain: np.ndarray
    scenario: str
    forget_classes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.forget) == 0:
            raise ValueError("the forget split is empty")
        if len(self.retain) == 0:
            raise ValueError("the retain split is empty")
        if np.intersect1d(self.forget, self.retain).size:
            raise ValueError("forget and retain indices overlap")

    def datasets(self, train: Dataset) -> tuple[Subset, Subset]:
        """``(forget, retain)`` views of ``train``."""
        return Subset(train, self.forget.tolist()), Subset(train, self.retain.tolist())


def labels_of(dataset: Dataset) -> np.ndarray:
    """Integer labels of a dataset of ``(input, label)`` pairs.

    Subset views are resolved to their base dataset; TensorDataset and torchvision-style ``targets`` are read
    directly, anything else sample by sample.
    """
    base, indices = base_and_indices(dataset)
    tensors = getattr(base, "tensors", None)
    if tensors is not None:
        return tensors[1].cpu().numpy()[indices]
    targets = getattr(base, "targets", None)
    if targets is not None:
        return np.asarray(targets)[indices]
    return np.asarray([int(base[int(i)][1]) for i in indices])


def _take_retain(pool: np.ndarray, retain_size: int | None, rng: np.random.Generator) -> np.ndarray:
    if retain_size is None:
        return np.sort(pool)
    if retain_size < 1:
        raise ValueError(f"retain_size must be >= 1, got {retain_size}")
    if retain_size > len(pool):
        raise ValueError(f"retain_size {retain_size} exceeds the {len(pool)} training samples left to retain")
    return np.sort(rng.choice(pool, size=retain_size, replace=False))


def random_forgetting_split(
    labels: np.ndarray | torch.Tensor, *, forget_size: int, retain_size: int | None, seed: int
) -> UnlearningSplit:
    """Forget ``forget_size`` random samples; retain ``retain_size`` others (None: all the rest)."""
    labels = np.asarray(labels)
    if not 1 <= forget_size < len(labels):
        raise ValueError(f"forget_size must be between 1 and {len(labels) - 1}, got {forget_size}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    forget = np.sort(order[:forget_size])
    retain = _take_retain(order[forget_size:], retain_size, rng)
    return UnlearningSplit(forget=forget, retain=retain, scenario="random")


def class_forgetting_split(
    labels: np.ndarray | torch.Tensor, *, forget_class: int, retain_size: int | None, seed: int
) -> UnlearningSplit:
    """Forget every sample of ``forget_class``; retain ``retain_size`` samples of the other classes."""
    labels = np.asarray(labels)
    forget = np.flatnonzero(labels == forget_class)
    if forget.size == 0:
        present = sorted(set(labels.tolist()))
        raise ValueError(f"class {forget_class} has no training samples; classes present: {present}")
    rng = np.random.default_rng(seed)
    retain = _take_retain(np.flatnonzero(labels != forget_class), retain_size, rng)
    return UnlearningSplit(forget=forget, retain=retain, scenario="class", forget_classes=(int(forget_class),))
