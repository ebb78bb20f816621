"""The bench's executors: each backend that runs on CPU gives the in-process records, and resumes by key.

One tiny digits config (2 methods x 2 seeds, test phase only) runs in this process for the reference records. Each
backend then starts from a results log that already holds two of them: it must run exactly the two others, once,
with the reference's records, and a rerun must run nothing. (The torchrun backend is checked the same way in
``test_distributed.py``, inside its gloo processes.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bench_helpers import run_test_phase

from orthograd.bench.executors import Executor
from orthograd.bench.executors.local import InProcess, ProcessPool
from orthograd.image_bench.config import validate_config
from orthograd.image_bench.jobs import job_key
from orthograd.io import ResultsLog

# what does not depend on where a job ran (wall times, memory peaks and the device do)
SAME_EVERYWHERE = ("key", "phase", "method", "seed", "hyperparameters", "retain_size", "split", "final", "steps",
                   "stop_reason", "uis")


def _raw(cache: Path) -> dict[str, Any]:
    return {
        "name": "tiny_executors",
        "data": {"name": "digits", "train_size": 300, "test_size": 100},
        "model": {"arch": "small_cnn", "width": 4},
        "train": {"epochs": 2, "lr": 3.0e-3, "batch_size": 64},
        "scenario": {"kind": "random", "forget_size": 40, "retain_size": 60, "retrain": False},
        "protocol": {"seeds": [0, 1], "max_epochs": 1, "stop": False},
        "methods": {"neggrad": {"params": {"lr": 5.0e-3, "forget_batch_size": 20}},
                    "orthograd": {"params": {"schedule": "fixed", "lr": 1.0e-3, "forget_batch_size": 20,
                                             "retain_batch_size": 30}}},
        "device": "cpu",
        "cache_dir": str(cache),
    }


def _same(record: dict[str, Any]) -> dict[str, Any]:
    return {name: record[name] for name in SAME_EVERYWHERE}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The raw config and its records, run in this process."""
    tmp = tmp_path_factory.mktemp("executors")
    raw = _raw(tmp / "cache")
    records = run_test_phase(validate_config(raw), raw, out_dir=tmp / "run", backend=InProcess())
    assert len(records) == 4
    return raw, records


def _ray(out: Path) -> Executor:
    pytest.importorskip("ray")
    from orthograd.bench.executors.ray_tune import RayTune, TrialResources

    return RayTune(storage=out / "ray", resources=TrialResources(cpus=1), num_cpus=2)


BACKENDS: list[Any] = [
    pytest.param(lambda out: InProcess(), id="in_process"),
    pytest.param(lambda out: ProcessPool(workers=2, threads=1), id="process_pool"),
    pytest.param(_ray, id="ray_tune", marks=pytest.mark.ray),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_backend_runs_each_unfinished_job_once_with_the_in_process_record(
    backend: Callable[[Path], Executor], reference: tuple[dict[str, Any], list[dict[str, Any]]], tmp_path: Path
) -> None:
    raw, expected = reference
    out = tmp_path / "run"
    log = ResultsLog(out / "results.jsonl")
    for record in expected[:2]:  # a bench that stopped after two runs
        log.append(record)
    executor = backend(out)
    starts: list[tuple[str, int]] = []
    ran: list[dict[str, Any]] = []
    try:
        for _ in range(2):  # resume, then rerun a finished bench
            records = run_test_phase(validate_config(raw), raw, out_dir=out, backend=executor,
                                on_start=lambda phase, todo: starts.append((phase, todo)), on_run=ran.append)
    finally:
        getattr(executor, "close", lambda: None)()
    assert starts == [("test", 2), ("test", 0)]
    by_key = {r["key"]: _same(r) for r in expected}
    assert sorted(r["key"] for r in ran) == sorted(r["key"] for r in expected[2:])
    assert all(_same(r) == by_key[r["key"]] for r in ran)
    written = log.records()
    assert written[:2] == expected[:2] and sorted(r["key"] for r in written) == sorted(by_key)
    assert sorted(r["key"] for r in records) == sorted(by_key)


def test_job_keys_are_pinned() -> None:
    """A changed key makes every logged run of a config run again: change the key scheme only with a new record
    format and its rule in ``bench.upgrade`` (whose test pins the format-2 keys)."""
    config = validate_config(_raw(Path("cache")))
    neggrad = job_key(config, phase="test", method="neggrad", hyperparameters={"lr": 5.0e-3, "forget_batch_size": 20},
                      split_index=1, retain_size=60)
    orthograd = job_key(config, phase="test", method="orthograd",
                        hyperparameters={"lora": {"r": 4, "lora_alpha": 16}}, split_index=0, retain_size=60)
    assert (neggrad, orthograd) == ("16508a3caaf82803", "f3b4b317d6035b37")
