"""Trained models on disk, by name: the original models and retrained references of every benchmark task.

A model is trained once and stored as safetensors (tied weights, as Whisper's, stored once) next to a JSON sidecar
(training time, what it was trained on); both are written atomically and the sidecar last, so a crash never leaves
an entry that loads, and two processes that train the same entry at once (two benchmarks sharing a store) each
write it whole. The name carries the content hash of whatever determines the model, so a changed setting
trains a new model instead of loading a stale one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from orthograd.io import atomic_write_file, atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedModel:
    """A model from the store, with the training time its sidecar recorded and whether it was already there."""

    model: nn.Module
    train_time_s: float
    cache_hit: bool
    path: Path


class ModelStore:
    """The trained models under ``root`` (one ``NAME.safetensors`` + ``NAME.json`` pair each)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def get(
        self,
        name: str,
        *,
        build: Callable[[], nn.Module],
        train: Callable[[nn.Module], Any],
        meta: Mapping[str, Any] | None = None,
    ) -> TrainedModel:
        """The model stored as ``name``; else ``build()`` a fresh one, ``train`` it in place and store it.

        The stored model is returned on the CPU in eval mode; ``meta`` (JSON-able) is written to the sidecar.
        """
        weights, sidecar = self.root / f"{name}.safetensors", self.root / f"{name}.json"
        model = build()
        if weights.is_file() and sidecar.is_file():
            load_model(model, str(weights))
            info = json.loads(sidecar.read_text(encoding="utf-8"))
            return TrainedModel(model.eval(), float(info["train_time_s"]), True, weights)
        log.info("training %s", name)
        started = time.perf_counter()
        train(model)
        elapsed = time.perf_counter() - started
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise FloatingPointError(
                f"training {name} diverged (non-finite weights): lower the training learning rate or raise its "
                "batch size"
            )
        model = model.cpu().eval()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_file(weights, lambda tmp: save_model(model, str(tmp)))
        atomic_write_json(sidecar, {**dict(meta or {}), "name": name, "train_time_s": elapsed})
        return TrainedModel(model, elapsed, False, weights)
