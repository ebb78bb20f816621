"""The image bench's original model and retrain-from-scratch references, each trained once and kept in the store.

The original model's name carries the hash of the data, model and training sections of the config; a retrained
reference adds the fingerprint of the forget set it leaves out (``bench.model_store`` keeps them on disk).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from orthograd.bench.model_store import ModelStore, TrainedModel
from orthograd.image_bench.config import BenchConfig
from orthograd.image_bench.data import BenchData
from orthograd.image_bench.models import build_model
from orthograd.tasks.batches import dataset_size
from orthograd.training import train_model


def indices_fingerprint(indices: np.ndarray) -> str:
    """Short hash of a set of sample indices (the identity of a forget or retain split)."""
    data = np.ascontiguousarray(np.sort(np.asarray(indices, dtype=np.int64)))
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


class ModelCache:
    """Trained models of a benchmark config in its ``cache_dir`` (``ModelStore``): the original and retrained
    references."""

    def __init__(self, config: BenchConfig, data: BenchData, *, device: torch.device) -> None:
        self.config = config
        self.data = data
        self.device = device
        self.key = config.original_hash()
        self.store = ModelStore(config.model_cache())

    def fresh_model(self) -> nn.Module:
        """An untrained model of the config (initialised from ``train.init_seed`` when set)."""
        if self.config.train.init_seed is not None:
            torch.manual_seed(self.config.train.init_seed)
        return build_model(
            self.config.model,
            num_classes=self.data.num_classes,
            in_channels=self.data.in_channels,
            image_size=self.data.image_size,
        )

    def original(self) -> TrainedModel:
        """The original model, trained on the whole training split (cached)."""
        return self._get(f"original-{self.key}", self.data.train, meta={"kind": "original"})

    def retrained(self, forget_indices: np.ndarray) -> TrainedModel:
        """The reference trained from scratch without the forget set (same settings and seed as the original)."""
        keep = np.setdiff1d(np.arange(len(self.data.train_labels)), forget_indices)
        fingerprint = indices_fingerprint(forget_indices)
        return self._get(
            f"retrain-{self.key}-{fingerprint}",
            torch.utils.data.Subset(self.data.train, keep.tolist()),
            meta={"kind": "retrain", "forget_fingerprint": fingerprint},
        )

    def _train(self, model: nn.Module, dataset: Dataset) -> None:
        """Cross-entropy training with the config's ``train`` settings (``orthograd.training.train_model``)."""
        train = self.config.train
        train_model(model, dataset, task="classification", epochs=train.epochs, lr=train.lr,
                    batch_size=train.batch_size, optimizer=train.optimizer, momentum=train.momentum,
                    weight_decay=train.weight_decay, seed=train.seed, device=self.device)

    def _get(self, name: str, dataset: Dataset, *, meta: dict[str, Any]) -> TrainedModel:
        return self.store.get(
            name,
            build=self.fresh_model,
            train=lambda model: self._train(model, dataset),
            meta={**meta, "config_hash": self.key, "samples": dataset_size(dataset),
                  "config": self.config.model_dump(mode="json", include={"data", "model", "train"})},
        )
