"""Run a benchmark config: original model -> (sweep on validation) -> methods x splits on test -> results log.

Every unlearning run is a ``Job`` with a key (method, scenario, seed/class, retain size, hyperparameters, and the
hash of the original model's config). Finished runs are records in ``RUN_DIR/results.jsonl`` (``io.ResultsLog``:
one fsynced line per run, a torn tail never trusted), so rerunning the same command skips them and an
interrupted bench resumes where it stopped. Where the jobs run is the bench's ``Executor`` (``bench.executors``):
this process or worker processes (``orthograd bench``), Ray Tune trials (``orthograd sweep``), torchrun's ranks
(``orthograd unlearn-ddp``); the plan, the keys, the skipping and the log are the same for all.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import Subset

from orthograd.api import unlearn
from orthograd.bench.config import BenchConfig, content_hash
from orthograd.bench.data import BenchData, load_bench_data
from orthograd.bench.executors import Executor, ProcessPool, RunJob
from orthograd.bench.jobs import Job, grid_points, job_key, make_split, n_splits, split_seed
from orthograd.bench.memory import PeakMemory
from orthograd.bench.training import ModelCache, evaluate, indices_fingerprint
from orthograd.data.splits import UnlearningSplit
from orthograd.io import ResultsLog, atomic_write_json, atomic_write_text
from orthograd.privacy import privacy_metrics
from orthograd.reporting import run_record
from orthograd.results import UnlearnResult
from orthograd.runtime import resolve_device

log = logging.getLogger(__name__)
RESULTS_FILE = "results.jsonl"
SELECTION_FILE = "selection.json"


# ----------------------------------------------------------------------------------------- execution of one job


@dataclass
class BenchContext:
    """What every job of one config needs, built once per process."""

    config: BenchConfig
    data: BenchData
    original: torch.nn.Module
    device: torch.device


_CONTEXTS: dict[str, BenchContext] = {}


def bench_context(config: BenchConfig) -> BenchContext:
    """The data and the original model of ``config`` in this process (trained and cached on first use)."""
    key = content_hash(config.model_dump(mode="json"))
    if key not in _CONTEXTS:
        device = resolve_device(None if config.device == "auto" else config.device)
        data = load_bench_data(config.data)
        original = ModelCache(config, data, device=device).original().model
        _CONTEXTS[key] = BenchContext(config, data, original, device)
    return _CONTEXTS[key]


@dataclass(frozen=True)
class JobInputs:
    """One job in this process: its context, split, datasets and seed; the ``unlearn`` arguments and the record
    fields every backend derives from them the same way."""

    config: BenchConfig
    job: Job
    ctx: BenchContext
    split: UnlearningSplit
    forget: Subset
    retain: Subset
    seed: int

    @classmethod
    def of(cls, config: BenchConfig, job: Job) -> JobInputs:
        ctx = bench_context(config)
        split = make_split(config, ctx.data.train_labels, split_index=job.split_index, retain_size=job.retain_size)
        return cls(config, job, ctx, split, *split.datasets(ctx.data.train), split_seed(config, job.split_index))

    def unlearn_options(self, *, device: torch.device) -> dict[str, Any]:
        """Everything ``unlearn`` takes besides the model, the data and the evaluation set."""
        config = self.config
        return {
            "method": self.job.method,
            "stop": config.scenario.kind if config.unlearn.stop else None,
            "max_epochs": config.unlearn.max_epochs,
            "eval_every": config.unlearn.eval_every,
            "track": config.unlearn.track,
            "device": device,
            "seed": self.seed,
            "num_classes": self.ctx.data.num_classes,
            "forget_classes": self.split.forget_classes,
            **self.job.hyperparameters,
        }

    def record(self, result: UnlearnResult, *, device: torch.device, **extra: Any) -> dict[str, Any]:
        """The run's record: ``run_record`` with the job's identity and split, plus the backend's ``extra``."""
        job = self.job
        return run_record(
            result,
            scenario=self.config.scenario.kind,
            seed=self.seed,
            forget_class=self.split.forget_classes[0] if self.split.forget_classes else None,
            key=job.key,
            phase=job.phase,
            evaluated_on="validation" if job.phase == "sweep" else "test",
            bench=self.config.name,
            hyperparameters=job.hyperparameters,
            retain_size=job.retain_size,
            forget_size=len(self.split.forget),
            original_hash=self.config.original_hash(),
            device=str(device),
            **extra,
        )


def execute(config: BenchConfig, job: Job) -> dict[str, Any]:
    """Run one job and return its results record (with the retrained reference and privacy metrics when known)."""
    inputs = JobInputs.of(config, job)
    ctx, split, seed = inputs.ctx, inputs.split, inputs.seed
    evaluation = ctx.data.validation if job.phase == "sweep" else ctx.data.test
    assert evaluation is not None  # a sweep requires data.validation_size > 0 (config check)
    with PeakMemory(ctx.device) as memory:
        result = unlearn(ctx.original, inputs.forget, inputs.retain, test=evaluation,
                         **inputs.unlearn_options(device=ctx.device))
    reference = job.reference or {}
    retrain_time = reference.get("train_time_s")
    record = inputs.record(
        result,
        device=ctx.device,
        split={"forget": indices_fingerprint(split.forget), "retain": indices_fingerprint(split.retain)},
        memory=memory.report(),
        efficiency=retrain_time / result.wall_time_s if retrain_time and result.wall_time_s > 0 else None,
    )
    if "accuracy" in reference:
        record["retrained"] = reference["accuracy"]
        record["gap_to_retrained"] = {
            k: record["final"][k] - v for k, v in reference["accuracy"].items() if k in record["final"]
        }
    if job.phase == "test":
        sets = {"forget": inputs.forget, "retain": inputs.retain, "test": evaluation}
        record["privacy"] = privacy_metrics(
            result.model, **sets, device=ctx.device, seed=seed, reference=reference.get("privacy")
        )
        # the same attacks on the original model fill the Original row's MIA columns
        record["privacy"]["original"] = privacy_metrics(ctx.original, **sets, device=ctx.device, seed=seed)
    return record


# ------------------------------------------------------------------------------------------------- the bench


OnStart = Callable[[str, int], None]
OnRun = Callable[[dict[str, Any]], None]


class Bench:
    """A benchmark config bound to a run folder: plans jobs, skips finished ones, has the executor run the rest.

    ``executor`` (default: the config's ``workers`` processes, or this process) decides where jobs run;
    ``run_job`` (default: ``execute`` with this config) runs one. Both are swapped together by ``orthograd sweep``
    (Ray Tune) and ``orthograd unlearn-ddp`` (torchrun); nothing else changes.
    """

    def __init__(
        self,
        config: BenchConfig,
        raw: Mapping[str, Any],
        *,
        out_dir: str | Path,
        executor: Executor | None = None,
        run_job: RunJob | None = None,
    ) -> None:
        self.config = config
        self.raw = dict(raw)
        self.out = Path(out_dir)
        self.log = ResultsLog(self.out / RESULTS_FILE)
        self.executor = executor or ProcessPool(workers=config.workers, threads=config.threads_per_worker)
        self.run_job = run_job or partial(execute, config)

    def run(self, *, on_start: OnStart | None = None, on_run: OnRun | None = None) -> list[dict[str, Any]]:
        """Run every unfinished job (sweep first when configured); returns the test-phase records."""
        if self.executor.lead:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.raw, sort_keys=False))
        ctx = self.executor.prepare(partial(bench_context, self.config))
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

    def _references(self, ctx: BenchContext) -> dict[tuple[int, int], dict[str, Any]]:
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
        """The resume loop: skip the jobs whose key is in the log, append each other record as it finishes."""
        done = {r.get("key") for r in self.log.records()}
        todo = [job for job in jobs if job.key not in done]
        lead = self.executor.lead
        if on_start is not None and lead:
            on_start(phase, len(todo))

        def finish(record: dict[str, Any]) -> None:
            if lead:
                self.log.append(record)
                if on_run is not None:
                    on_run(record)

        self.executor.run(todo, self.run_job, on_record=finish)


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
