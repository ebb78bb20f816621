"""``--backend ray``: a tiny digits grid on a local Ray cluster (2 CPUs), then a resume on local processes.

Run 1 (Ray): the sweep grid has two OrthoGrad learning rates and one NegGrad point whose LoRA targets match no
module, so that trial fails at run time; the other trials' records must survive and the sweep must report the
failure. Run 2 (``--backend processes``, one worker): the failing point is dropped; the finished
trials are skipped by key, the best OrthoGrad point is selected by validation UIS and run on test.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from orthograd.bench.executors.ray_tune import TrialsFailed
from orthograd.bench.experiments import run_experiment
from orthograd.image_bench.config import validate_config
from orthograd.io import ResultsLog

LRS = [1.0e-4, 3.0e-2]


def _raw(cache: Path, *, failing_point: bool) -> dict[str, Any]:
    neggrad: dict[str, Any] = {"params": {"lr": 5.0e-3}}
    if failing_point:
        neggrad["grid"] = {"lora": [{"targets": ["no_such_module"]}]}
    return {
        "name": "tiny_sweep",
        "data": {"name": "digits", "validation_size": 100, "train_size": 500, "test_size": 200},
        "model": {"arch": "small_cnn", "width": 4},
        "train": {"epochs": 2, "lr": 3.0e-3, "batch_size": 64},
        "scenario": {"kind": "random", "forget_size": 40, "retain_size": 60},
        "protocol": {"seeds": [0], "max_epochs": 2, "stop": False},
        "methods": {
            "orthograd": {"params": {"optimizer": "adam", "forget_batch_size": 20, "retain_batch_size": 30},
                          "grid": {"lr": LRS}},
            "neggrad": neggrad,
        },
        "device": "cpu",
        "cache_dir": str(cache),
    }


def test_ray_sweep_keeps_finished_trials_resumes_and_selects_on_validation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    raw = _raw(tmp_path / "cache", failing_point=True)
    with pytest.raises(TrialsFailed, match="1 of 3 sweep trials failed"):
        run_experiment(validate_config(raw), raw=raw, out_dir=out, backend="ray",
                       backend_options={"num_cpus": 2, "cpus_per_trial": 1})
    first = ResultsLog(out / "results.jsonl").records()
    assert sorted(r["hyperparameters"]["lr"] for r in first) == LRS  # both good trials kept despite the failure
    assert {(r["phase"], r["evaluated_on"], r["method"]) for r in first} == {("sweep", "validation", "orthograd")}

    raw = _raw(tmp_path / "cache", failing_point=False)
    starts: list[tuple[str, int]] = []
    records = run_experiment(
        validate_config(raw), raw=raw, out_dir=out, backend="processes", backend_options={"num_cpus": 1},
        on_start=lambda phase, todo: starts.append((phase, todo)),
    )
    tested = [r for r in records if r["phase"] == "test"]
    assert starts == [("sweep", 0), ("test", 2)]  # the finished sweep trials were skipped, not rerun

    records = ResultsLog(out / "results.jsonl").records()
    sweep = [r for r in records if r["phase"] == "sweep"]
    assert len(sweep) == 2 and len(records) == 4 and len(tested) == 2
    best = min(sweep, key=lambda r: r["uis"])  # validation UIS: lower is better
    selection = yaml.safe_load((out / "selection.json").read_text())["orthograd"]
    assert selection["hyperparameters"]["lr"] == best["hyperparameters"]["lr"]
    assert selection["validation_uis"] == pytest.approx(statistics.fmean([best["uis"]]))
    test_orthograd = next(r for r in tested if r["method"] == "orthograd")
    assert test_orthograd["evaluated_on"] == "test"
    assert test_orthograd["hyperparameters"]["lr"] == best["hyperparameters"]["lr"]
    assert sweep[0]["uis"] != sweep[1]["uis"]  # the grid points differ, so the selection is a real choice
