"""Run a benchmark config: original model -> (sweep on validation) -> methods x splits on test -> results log.

Every unlearning run is a ``Job`` with a key (method, scenario, seed/class, retain size, hyperparameters, and the
hash of the original model's config). Finished runs are records in ``RUN_DIR/results.jsonl`` (``io.ResultsLog``:
one fsynced line per run, a torn tail never trusted), so rerunning the same command skips them and an
interrupted bench resumes where it stopped. Jobs run in this process, or in worker processes
(``ProcessPoolExecutor``) that each load the data and the cached original model once.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import statistics
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from orthograd import methods
from orthograd.api import unlearn
from orthograd.bench.config import BenchConfig, content_hash, validate_config
from orthograd.bench.data import BenchData, load_bench_data
from orthograd.bench.memory import PeakMemory
from orthograd.bench.training import ModelCache, evaluate, indices_fingerprint
from orthograd.data.splits import UnlearningSplit, class_forgetting_split, random_forgetting_split
from orthograd.io import ResultsLog, atomic_write_json, atomic_write_text
from orthograd.privacy import privacy_metrics
from orthograd.reporting import run_record
from orthograd.runtime import resolve_device

log = logging.getLogger(__name__)
RESULTS_FILE = "results.jsonl"
SELECTION_FILE = "selection.json"


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
            "hyperparameters": resolved,
            "scenario": config.scenario.kind,
            "forget_size": config.scenario.forget_size,
            "split": split_seed(config, split_index) if config.scenario.kind == "random"
            else config.scenario.classes[split_index],
            "retain_size": retain_size,
            "original": config.original_hash(),
            "unlearn": config.unlearn.model_dump(mode="json"),
        }
    )


def grid_points(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a method's grid values, in the order the config lists them."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


# ----------------------------------------------------------------------------------------- execution of one job


@dataclass
class _Context:
    """What every job of one config needs, built once per process."""

    config: BenchConfig
    data: BenchData
    original: torch.nn.Module
    device: torch.device


_CONTEXTS: dict[str, _Context] = {}


def _context(config: BenchConfig) -> _Context:
    key = content_hash(config.model_dump(mode="json"))
    if key not in _CONTEXTS:
        device = resolve_device(None if config.device == "auto" else config.device)
        data = load_bench_data(config.data)
        original = ModelCache(config, data, device=device).original().model
        _CONTEXTS[key] = _Context(config, data, original, device)
    return _CONTEXTS[key]


def execute(config: BenchConfig, job: Job) -> dict[str, Any]:
    """Run one job and return its results record."""
    ctx = _context(config)
    split = make_split(config, ctx.data.train_labels, split_index=job.split_index, retain_size=job.retain_size)
    forget, retain = split.datasets(ctx.data.train)
    evaluation = ctx.data.validation if job.phase == "sweep" else ctx.data.test
    assert evaluation is not None  # a sweep requires data.validation_size > 0 (config check)
    seed = split_seed(config, job.split_index)
    with PeakMemory(ctx.device) as memory:
        result = unlearn(
            ctx.original,
            forget,
            retain,
            method=job.method,
            test=evaluation,
            stop=config.scenario.kind if config.unlearn.stop else None,
            max_epochs=config.unlearn.max_epochs,
            eval_every=config.unlearn.eval_every,
            track=config.unlearn.track,
            device=ctx.device,
            seed=seed,
            num_classes=ctx.data.num_classes,
            forget_classes=split.forget_classes,
            **job.hyperparameters,
        )
    reference = job.reference or {}
    retrain_time = reference.get("train_time_s")
    extra: dict[str, Any] = {
        "key": job.key,
        "phase": job.phase,
        "evaluated_on": "validation" if job.phase == "sweep" else "test",
        "bench": config.name,
        "hyperparameters": job.hyperparameters,
        "retain_size": job.retain_size,
        "forget_size": len(split.forget),
        "split": {"forget": indices_fingerprint(split.forget), "retain": indices_fingerprint(split.retain)},
        "original_hash": config.original_hash(),
        "device": str(ctx.device),
        "memory": memory.report(),
        "efficiency": retrain_time / result.wall_time_s if retrain_time and result.wall_time_s > 0 else None,
    }
    record = run_record(
        result,
        scenario=config.scenario.kind,
        seed=seed,
        forget_class=split.forget_classes[0] if split.forget_classes else None,
        **extra,
    )
    if "accuracy" in reference:
        record["retrained"] = reference["accuracy"]
        record["gap_to_retrained"] = {
            k: record["final"][k] - v for k, v in reference["accuracy"].items() if k in record["final"]
        }
    if job.phase == "test":
        sets = {"forget": forget, "retain": retain, "test": evaluation}
        record["privacy"] = privacy_metrics(
            result.model, **sets, device=ctx.device, seed=seed, reference=reference.get("privacy")
        )
        # the same attacks on the original model fill the Original row's MIA columns
        record["privacy"]["original"] = privacy_metrics(ctx.original, **sets, device=ctx.device, seed=seed)
    return record


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _execute_in_worker(raw: dict[str, Any], job: Job) -> dict[str, Any]:
    return execute(validate_config(raw), job)


# ------------------------------------------------------------------------------------------------- the bench


OnStart = Callable[[str, int], None]
OnRun = Callable[[dict[str, Any]], None]


class Bench:
    """A benchmark config bound to a run folder: plans jobs, skips finished ones, runs the rest."""

    def __init__(self, config: BenchConfig, raw: Mapping[str, Any], *, out_dir: str | Path) -> None:
        self.config = config
        self.raw = dict(raw)
        self.out = Path(out_dir)
        self.log = ResultsLog(self.out / RESULTS_FILE)

    def run(self, *, on_start: OnStart | None = None, on_run: OnRun | None = None) -> list[dict[str, Any]]:
        """Run every unfinished job (sweep first when configured); returns the test-phase records."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.raw, sort_keys=False))
        ctx = _context(self.config)
        references = self._references(ctx) if self.config.scenario.retrain else {}
        chosen = {name: dict(hyper) for name, hyper in self.config.methods.items()}
        if self.config.sweep is not None:
            sweep_jobs = self._sweep_jobs()
            self._run_jobs("sweep", sweep_jobs, on_start, on_run)
            chosen.update(self._select(sweep_jobs))
        test_jobs = self._test_jobs(chosen, references)
        self._run_jobs("test", test_jobs, on_start, on_run)
        keys = {job.key for job in test_jobs}
        return [r for r in self.log.records() if r.get("key") in keys]

    def _splits(self) -> Iterator[tuple[int, int]]:
        for retain_size in self.config.scenario.retain_size:
            for index in range(n_splits(self.config)):
                yield index, retain_size

    def _job(self, phase: str, method: str, hyper: dict[str, Any], index: int, retain_size: int,
             reference: dict[str, Any] | None = None) -> Job:
        key = job_key(self.config, phase=phase, method=method, hyperparameters=hyper, split_index=index,
                      retain_size=retain_size)
        return Job(phase, method, hyper, index, retain_size, key, reference)

    def _sweep_jobs(self) -> list[Job]:
        """Each grid point on the first ``sweep.splits`` splits, at ``sweep.retain_size`` (default: the first)."""
        assert self.config.sweep is not None
        retain_size = self.config.sweep.retain_size or self.config.scenario.retain_size[0]
        return [
            self._job("sweep", name, {**self.config.methods[name], **point}, index, retain_size)
            for name, grid in self.config.sweep.grid.items()
            for point in grid_points(grid)
            for index in range(self.config.sweep.splits)
        ]

    def _select(self, jobs: list[Job]) -> dict[str, dict[str, Any]]:
        """Per method, the grid point with the lowest mean validation UIS (ties: the first listed)."""
        by_key = {r["key"]: r for r in self.log.records()}
        scores: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        for method in dict.fromkeys(job.method for job in jobs):
            points: dict[str, tuple[dict[str, Any], list[float]]] = {}
            for job in (j for j in jobs if j.method == method):
                uis = by_key[job.key]["uis"]
                entry = points.setdefault(content_hash(job.hyperparameters), (job.hyperparameters, []))
                entry[1].append(float("inf") if uis is None else uis)
            scores[method] = [(statistics.fmean(values), hyper) for hyper, values in points.values()]
        selection = {m: min(s, key=lambda item: item[0]) for m, s in scores.items()}
        atomic_write_json(
            self.out / SELECTION_FILE,
            {m: {"hyperparameters": h, "validation_uis": u, "grid": [{"hyperparameters": hh, "validation_uis": uu}
                                                                       for uu, hh in scores[m]]}
             for m, (u, h) in selection.items()},
        )
        return {m: h for m, (_, h) in selection.items()}

    def _test_jobs(self, chosen: Mapping[str, dict[str, Any]], references: Mapping[tuple[int, int], Any]) -> list[Job]:
        return [
            self._job("test", name, hyper, index, retain_size, references.get((index, retain_size)))
            for index, retain_size in self._splits()
            for name, hyper in chosen.items()
        ]

    def _references(self, ctx: _Context) -> dict[tuple[int, int], dict[str, Any]]:
        """Per split: the retrained model's accuracies, privacy metrics and training time (trained once, cached)."""
        cache = ModelCache(self.config, ctx.data, device=ctx.device)
        out: dict[tuple[int, int], dict[str, Any]] = {}
        for index, retain_size in self._splits():
            split = make_split(self.config, ctx.data.train_labels, split_index=index, retain_size=retain_size)
            trained = cache.retrained(split.forget)
            forget, retain = split.datasets(ctx.data.train)
            model = trained.model.to(ctx.device)
            sets = {"forget": forget, "retain": retain, "test": ctx.data.test}
            out[(index, retain_size)] = {
                "train_time_s": trained.train_time_s,
                "accuracy": {name: evaluate(model, data, device=ctx.device) for name, data in sets.items()},
                "privacy": privacy_metrics(model, **sets, device=ctx.device, seed=split_seed(self.config, index)),
            }
        return out

    def _run_jobs(self, phase: str, jobs: list[Job], on_start: OnStart | None, on_run: OnRun | None) -> None:
        done = {r.get("key") for r in self.log.records()}
        todo = [job for job in jobs if job.key not in done]
        if on_start is not None:
            on_start(phase, len(todo))
        workers = min(self.config.workers, len(todo))
        if workers <= 1:
            for job in todo:
                self._finish(execute(self.config, job), on_run)
            return
        threads = self.config.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(threads,),
        ) as pool:
            pending: set[Future[dict[str, Any]]] = {pool.submit(_execute_in_worker, self.raw, job) for job in todo}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        self._finish(future.result(), on_run)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise

    def _finish(self, record: dict[str, Any], on_run: OnRun | None) -> None:
        self.log.append(record)
        if on_run is not None:
            on_run(record)


def run_bench(
    config: BenchConfig,
    raw: Mapping[str, Any],
    *,
    out_dir: str | Path,
    on_start: OnStart | None = None,
    on_run: OnRun | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the benchmark into ``out_dir``; returns the test-phase records."""
    return Bench(config, raw, out_dir=out_dir).run(on_start=on_start, on_run=on_run)
