"""The image benchmark's data: the config's data set (``data.digits``, ``data.images``) with the validation split
held out and train/test subsampled as the config asks; a data set that cannot be read is a ``ConfigError`` that
names the expected layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from orthograd.bench.config import ConfigError
from orthograd.data import load_digits_dataset
from orthograd.data.images import load_cifar10, load_fashion_mnist, load_imagenet
from orthograd.data.splits import labels_of
from orthograd.image_bench.config import DataConfig
from orthograd.tasks.batches import dataset_size


@dataclass(frozen=True)
class BenchData:
    """Train (what the original model learns, forget/retain splits come from it), validation and test sets."""

    train: Dataset
    train_labels: np.ndarray
    validation: Dataset | None
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int  # side of the (square) input images


def _take(dataset: Dataset, indices: np.ndarray) -> Dataset:
    """The samples at ``indices``: copied tensors for in-memory data (fast batching), else a ``Subset`` view."""
    if isinstance(dataset, TensorDataset):
        index = torch.from_numpy(indices)
        return TensorDataset(*(t[index] for t in dataset.tensors))
    return Subset(dataset, indices.tolist())


def _full_sets(config: DataConfig) -> tuple[Dataset, Dataset]:
    if config.name == "digits":
        return load_digits_dataset()
    if config.name == "fashion_mnist":
        return load_fashion_mnist(config.root)
    assert config.root is not None  # enforced by DataConfig
    if config.name == "cifar10":
        return load_cifar10(config.root, verify_checksums=config.verify_checksums)
    return load_imagenet(config.root, image_size=config.image_size)


def load_bench_data(config: DataConfig) -> BenchData:
    """The config's dataset with its validation split held out and train/test subsampled (seeded)."""
    try:
        train, test = _full_sets(config)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    train_labels = labels_of(train)
    num_classes = int(max(train_labels.max(), labels_of(test).max())) + 1
    first = train[0][0]
    in_channels, image_size = int(first.shape[0]), int(first.shape[-1])

    rng = np.random.default_rng(config.split_seed)
    order = rng.permutation(len(train_labels))
    needed = config.validation_size + (config.train_size or 0)
    if needed > len(order) or config.validation_size >= len(order):
        raise ConfigError(
            f"data.validation_size ({config.validation_size}) + data.train_size ({config.train_size}) exceed the "
            f"{len(order)} training samples of {config.name}"
        )
    validation_idx = np.sort(order[: config.validation_size])
    rest = order[config.validation_size :]
    train_idx = np.sort(rest[: config.train_size] if config.train_size else rest)
    validation = _take(train, validation_idx) if config.validation_size else None
    if config.test_size is not None:
        available = dataset_size(test)
        if config.test_size > available:
            raise ConfigError(f"data.test_size {config.test_size} exceeds the {available} test samples")
        test_idx = np.sort(rng.permutation(available)[: config.test_size])
        test = _take(test, test_idx)
    return BenchData(
        train=_take(train, train_idx),
        train_labels=train_labels[train_idx],
        validation=validation,
        test=test,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
    )
