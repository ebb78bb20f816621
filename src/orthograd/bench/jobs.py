"""The bench's job planner: a ``Job`` per run, its key, its forget/retain split and the sweep's grid points.

A job's key is its identity in the results log: the same config planned again gives the same keys, so finished
runs are found and skipped whichever backend ran them (``bench.executors``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orthograd import methods
from orthograd.bench.config import content_hash
from orthograd.bench.image_config import BenchConfig
from orthograd.data.splits import UnlearningSplit, class_forgetting_split, random_forgetting_split


@dataclass(frozen=True)
class Job:
    """One unlearning run: a method with hyperparameters on one split, scored on validation or test."""

    phase: str  # "sweep" (scored on the validation split) | "test"
    method: str
    hyperparameters: dict[str, Any]
    split_index: int  # index into scenario.seeds (random) or scenario.classes (class)
    retain_size: int
    key: str
    reference: dict[str, Any] | None = field(default=None, compare=False)  # the retrained model's metrics
    variant: int = field(default=0, compare=False)  # which of the config's variants (bench.config.variants_of)


def make_split(config: BenchConfig, labels: np.ndarray, *, split_index: int, retain_size: int) -> UnlearningSplit:
    """The forget/retain split of ``split_index`` (a seed or a class) with ``retain_size`` retained samples."""
    scenario = config.scenario
    if scenario.kind == "random":
        assert scenario.forget_size is not None
        return random_forgetting_split(
            labels, forget_size=scenario.forget_size, retain_size=retain_size, seed=scenario.seeds[split_index]
        )
    return class_forgetting_split(
        labels, forget_class=scenario.classes[split_index], retain_size=retain_size, seed=split_index
    )


def split_seed(config: BenchConfig, split_index: int) -> int:
    """The run seed of a split: the scenario seed (random) or the class's position (class)."""
    return config.scenario.seeds[split_index] if config.scenario.kind == "random" else split_index


def n_splits(config: BenchConfig) -> int:
    scenario = config.scenario
    return len(scenario.seeds) if scenario.kind == "random" else len(scenario.classes)


def job_key(config: BenchConfig, *, phase: str, method: str, hyperparameters: Mapping[str, Any],
            split_index: int, retain_size: int) -> str:
    """Identity of a run: rerunning the same config finds it finished under this key."""
    resolved = methods.make_config(method, dict(hyperparameters)).to_dict()
    return content_hash(
        {
            "phase": phase,
            "method": method,
            "hyperparameters": _as_first_keyed(resolved),
            "scenario": config.scenario.kind,
            "forget_size": config.scenario.forget_size,
            "split": split_seed(config, split_index) if config.scenario.kind == "random"
            else config.scenario.classes[split_index],
            "retain_size": retain_size,
            "original": config.original_hash(),
            "unlearn": _without_later_defaults(config.unlearn.model_dump(mode="json")),
        }
    )


# Settings added after results logs were first written, at the value that reproduces the earlier behaviour: left
# out of a key, so that older logs resume (a new setting at another value makes a new key).
_LATER_DEFAULTS: dict[str, Any] = {"track": "all", "fuse_passes": False, "privacy": True}


def _without_later_defaults(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in _LATER_DEFAULTS or v != _LATER_DEFAULTS[k]}


def _as_first_keyed(resolved: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters in the form keys were first written with, so older results logs resume: LoRA's
    ``lora_alpha`` hashed under its earlier name ``alpha``, later settings at their earlier behaviour left out."""
    resolved = _without_later_defaults(resolved)
    lora = resolved.get("lora")
    if not isinstance(lora, dict):
        return resolved
    return {**resolved, "lora": {("alpha" if name == "lora_alpha" else name): v for name, v in lora.items()}}
