"""The image bench's job planner: each run's key (``job_key``) and its forget/retain split (test or validation).

A run is the engine's ``bench.jobs.Job`` (split: ``split_index`` and ``retain_size``); its key hashes what changes
its numbers, so the same config planned again gives the same keys, and finished runs are found and skipped
whichever backend ran them (``bench.executors``).

Validation splits never share a sample with a test split, by construction: when a row has a grid, a validation
pool of training samples is set aside first (random forgetting: ``forget_size`` + the tuning retain size samples;
class forgetting: every sample of the validation classes, which no test split forgets, and the tuning retain size
samples of the classes that are neither tested nor validation classes) and the test splits are drawn from the rest.
``check_disjoint`` verifies it on the actual indices before any run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from orthograd import methods
from orthograd.bench.config import ConfigError, content_hash
from orthograd.data.splits import UnlearningSplit, class_forgetting_split, random_forgetting_split
from orthograd.image_bench.config import BenchConfig

SWEEP = "sweep"  # the phase scored on the validation split


def validation_classes(config: BenchConfig, labels: np.ndarray) -> list[int]:
    """Class forgetting: the classes the validation splits forget (``tuning.classes``, else the first untested)."""
    if config.tuning.classes:
        return list(config.tuning.classes)
    untested = [int(c) for c in np.unique(labels) if int(c) not in config.scenario.classes]
    if len(untested) < config.tuning.splits + 1:
        raise ConfigError(
            f"class forgetting validates on classes no test split forgets, and its retain set on other untested "
            f"classes: {config.tuning.splits} validation class(es) need {config.tuning.splits + 1} untested classes, "
            f"scenario.classes leaves {untested}; test fewer classes"
        )
    return untested[: config.tuning.splits]


def _sweep_retain_size(config: BenchConfig) -> int:
    return config.tuning.retain_size or config.scenario.retain_size[0]


def _validation_pool(config: BenchConfig, labels: np.ndarray) -> np.ndarray:
    """The training indices set aside for the validation splits (sorted)."""
    rng = np.random.default_rng(config.tuning.seed)
    retain_size = _sweep_retain_size(config)
    if config.scenario.kind == "random":
        assert config.scenario.forget_size is not None
        size = config.scenario.forget_size + retain_size
        if size >= len(labels):
            raise ConfigError(f"the validation pool ({size} samples) leaves no training samples for the test splits")
        return np.sort(rng.choice(len(labels), size=size, replace=False))
    classes = validation_classes(config, labels)
    others = np.flatnonzero(~np.isin(labels, [*config.scenario.classes, *classes]))
    if retain_size > len(others):
        raise ConfigError(f"tuning retain size {retain_size} exceeds the {len(others)} samples of untested classes")
    forget = np.flatnonzero(np.isin(labels, classes))
    return np.sort(np.concatenate([forget, rng.choice(others, size=retain_size, replace=False)]))


def _within(indices: np.ndarray, split: UnlearningSplit) -> UnlearningSplit:
    """``split`` (indices into ``labels[indices]``) as indices into the full training set."""
    return UnlearningSplit(forget=indices[split.forget], retain=indices[split.retain], scenario=split.scenario,
                           forget_classes=split.forget_classes)


def make_split(
    config: BenchConfig, labels: np.ndarray, *, split_index: int, retain_size: int, phase: str = "test"
) -> UnlearningSplit:
    """The forget/retain split of a job: test split ``split_index`` (a seed or a class) drawn from the samples
    outside the validation pool, or validation split ``split_index`` (``phase="sweep"``) drawn from the pool."""
    scenario = config.scenario
    if phase == SWEEP:
        pool = _validation_pool(config, labels)
        if scenario.kind == "random":
            assert scenario.forget_size is not None
            split = random_forgetting_split(labels[pool], forget_size=scenario.forget_size, retain_size=retain_size,
                                            seed=config.tuning.seed + 1 + split_index)
            return _within(pool, split)
        forget_class = validation_classes(config, labels)[split_index]
        others = [int(c) for c in validation_classes(config, labels) if c != forget_class]
        pool = pool[~np.isin(labels[pool], others)]  # the other validation classes are no split's retain samples
        split = class_forgetting_split(labels[pool], forget_class=forget_class, retain_size=retain_size,
                                       seed=split_index)
        return _within(pool, split)
    rest = np.arange(len(labels))
    if config.gridded():
        rest = np.setdiff1d(rest, _validation_pool(config, labels))
    if scenario.kind == "random":
        assert scenario.forget_size is not None
        split = random_forgetting_split(labels[rest], forget_size=scenario.forget_size, retain_size=retain_size,
                                        seed=config.protocol.seeds[split_index])
    else:
        split = class_forgetting_split(labels[rest], forget_class=scenario.classes[split_index],
                                       retain_size=retain_size, seed=split_index)
    return _within(rest, split)


def check_disjoint(config: BenchConfig, labels: np.ndarray) -> None:
    """Refuse a config whose validation splits share a training sample with any test split (forget or retain)."""
    if not config.gridded():
        return
    tested: set[int] = set()
    for retain_size in config.scenario.retain_size:
        for index in range(n_splits(config)):
            split = make_split(config, labels, split_index=index, retain_size=retain_size)
            tested.update(split.forget.tolist(), split.retain.tolist())
    for index in range(config.tuning.splits):
        split = make_split(config, labels, split_index=index, retain_size=_sweep_retain_size(config), phase=SWEEP)
        shared = tested & {*split.forget.tolist(), *split.retain.tolist()}
        if shared:
            raise ConfigError(f"validation split {index} shares {len(shared)} training samples with the test splits")


def split_seed(config: BenchConfig, split_index: int, *, phase: str = "test") -> int:
    """The run seed of a split: the scenario seed (random) or the class's position (class); a validation split's
    seed is set apart from every test seed (``tuning.seed`` + 1 + its index)."""
    if phase == SWEEP:
        return config.tuning.seed + 1 + split_index
    return config.protocol.seeds[split_index] if config.scenario.kind == "random" else split_index


def n_splits(config: BenchConfig) -> int:
    scenario = config.scenario
    return len(config.protocol.seeds) if scenario.kind == "random" else len(scenario.classes)


def job_key(config: BenchConfig, *, phase: str, method: str, hyperparameters: Mapping[str, Any],
            split_index: int, retain_size: int) -> str:
    """Identity of a run: rerunning the same config finds it finished under this key."""
    return content_hash(job_payload(config, phase=phase, method=method, hyperparameters=hyperparameters,
                                    split_index=split_index, retain_size=retain_size))


def job_payload(config: BenchConfig, *, phase: str, method: str, hyperparameters: Mapping[str, Any],
                split_index: int, retain_size: int) -> dict[str, Any]:
    """What ``job_key`` hashes: everything that changes a run's numbers (the method's settings resolved to their
    values, defaults included; the split; the original model; the run protocol as it acts)."""
    payload = {
        "phase": phase,
        "method": method,
        "hyperparameters": methods.make_config(method, dict(hyperparameters)).to_dict(),
        "scenario": config.scenario.kind,
        "forget_size": config.scenario.forget_size,
        "split": _split_identity(config, phase=phase, split_index=split_index),
        "retain_size": retain_size,
        "original": config.original_hash(),
        "unlearn": _effective_protocol(config),
    }
    if config.gridded():  # the test splits are drawn outside the validation pool
        payload["validation_pool"] = _pool_settings(config)
    return payload


def _split_identity(config: BenchConfig, *, phase: str, split_index: int) -> Any:
    if phase == SWEEP:
        return f"validation {split_index}"
    scenario = config.scenario
    return split_seed(config, split_index) if scenario.kind == "random" else scenario.classes[split_index]


def _pool_settings(config: BenchConfig) -> dict[str, Any]:
    tuning = config.tuning
    return {"seed": tuning.seed, "retain_size": _sweep_retain_size(config), "classes": tuning.classes,
            "splits": tuning.splits if config.scenario.kind == "class" else None}


def _effective_protocol(config: BenchConfig) -> dict[str, Any]:
    """The run protocol as it acts: ``checks_per_epoch`` only when there is a stop rule to check and no
    ``eval_every`` overrides it; ``max_steps`` only when set. Not the seeds (the split says which) nor the defaults
    (in the hyperparameters)."""
    values = config.protocol.model_dump(mode="json", exclude={"seeds", "defaults"})
    if values["eval_every"] is not None or not values["stop"]:
        values.pop("checks_per_epoch")
    if values["max_steps"] is None:
        values.pop("max_steps")
    return values
