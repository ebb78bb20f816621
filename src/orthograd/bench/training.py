"""The original model and the retrain-from-scratch reference, each trained once and cached on disk.

The original model's cache key is the hash of the data, model and training sections of the config; a retrained
reference adds the fingerprint of the forget set it leaves out. Weights are stored as safetensors next to a JSON
sidecar (training time, metrics), both written atomically, so a crash never leaves a cache entry that loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.data import Dataset

from orthograd.bench.config import BenchConfig, TrainConfig
from orthograd.bench.data import BenchData
from orthograd.bench.models import build_model
from orthograd.evaluation import evaluate as evaluate_metrics
from orthograd.io import atomic_write_bytes, atomic_write_json
from orthograd.training import train_classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedModel:
    """A trained model loaded from the cache, with what its sidecar recorded."""

    model: nn.Module
    train_time_s: float
    cache_hit: bool
    path: Path


def train_model(model: nn.Module, dataset: Dataset, *, config: TrainConfig, device: torch.device) -> nn.Module:
    """Plain supervised training with cross-entropy (Adam or SGD), seeded by ``config.seed``."""
    return train_classifier(
        model, dataset, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, optimizer=config.optimizer,
        momentum=config.momentum, weight_decay=config.weight_decay, seed=config.seed, device=device,
    )


def evaluate(model: nn.Module, dataset: Dataset, *, device: torch.device) -> float:
    """Accuracy (percent) of ``model`` on ``dataset``."""
    return evaluate_metrics(model, dataset, task="classification", device=device)["accuracy"]


def indices_fingerprint(indices: np.ndarray) -> str:
    """Short hash of a set of sample indices (the identity of a forget or retain split)."""
    data = np.ascontiguousarray(np.sort(np.asarray(indices, dtype=np.int64)))
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


class ModelCache:
    """Trained models of a benchmark config under ``cache_dir``: the original and retrained references."""

    def __init__(self, config: BenchConfig, data: BenchData, *, device: torch.device) -> None:
        self.config = config
        self.data = data
        self.device = device
        self.key = config.original_hash()
        self.root = Path(config.cache_dir)

    def fresh_model(self) -> nn.Module:
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

    def _get(self, name: str, dataset: Dataset, *, meta: dict[str, Any]) -> TrainedModel:
        weights, sidecar = self.root / f"{name}.safetensors", self.root / f"{name}.json"
        model = self.fresh_model()
        if weights.is_file() and sidecar.is_file():
            model.load_state_dict(load_file(str(weights)))
            info = json.loads(sidecar.read_text(encoding="utf-8"))
            return TrainedModel(model.eval(), float(info["train_time_s"]), True, weights)
        log.info("training %s (%d samples, %d epochs)", name, len(dataset), self.config.train.epochs)  # type: ignore[arg-type]
        started = time.perf_counter()
        train_model(model, dataset, config=self.config.train, device=self.device)
        elapsed = time.perf_counter() - started
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise FloatingPointError(
                f"training {name} diverged (non-finite weights); lower train.lr or raise train.batch_size"
            )
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(weights, save(state))
        atomic_write_json(
            sidecar,
            {**meta, "train_time_s": elapsed, "config_hash": self.key, "samples": len(dataset),  # type: ignore[arg-type]
             "config": self.config.model_dump(mode="json", include={"data", "model", "train"})},
        )
        return TrainedModel(model.cpu().eval(), elapsed, False, weights)
