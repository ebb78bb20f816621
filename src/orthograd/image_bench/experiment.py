"""The image-classification experiment: original model -> (sweep on validation) -> methods x splits on test.

Every unlearning run is a ``Job`` with a key (method, scenario, seed/class, retain size, hyperparameters, and the
hash of the original model's config). The engine (``bench.engine``) skips the jobs already in the results log, runs
the rest on its executor and logs each record, so an interrupted bench resumes where it stopped. A config with
``variants`` (``bench.config.variants_of``) is one experiment: each variant's jobs, one log, one table.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from orthograd.bench.config import content_hash
from orthograd.bench.engine import FinishedRuns, Phase
from orthograd.bench.jobs import Job, ProcessCache, record_key
from orthograd.bench.protocol import (
    Search,
    bench_unlearn,
    grid_size,
    method_accepts,
    run_schedule,
    select,
)
from orthograd.bench.records import record_envelope
from orthograd.bench.upgrade import lora_named
from orthograd.data.splits import UnlearningSplit
from orthograd.evaluation import evaluate
from orthograd.image_bench.config import BenchConfig
from orthograd.image_bench.data import BenchData, load_bench_data
from orthograd.image_bench.jobs import (
    SWEEP,
    check_disjoint,
    job_key,
    job_payload,
    make_split,
    n_splits,
    split_seed,
)
from orthograd.image_bench.memory import PeakMemory
from orthograd.image_bench.references import ModelCache, indices_fingerprint
from orthograd.image_bench.report import report_records
from orthograd.io import atomic_write_json
from orthograd.methods.base import MethodConfig, MethodContext, UnlearningMethod
from orthograd.metrics import uis
from orthograd.privacy import privacy_metrics
from orthograd.reporting import SCENARIOS, target_reached
from orthograd.results import UnlearnResult
from orthograd.runtime import resolve_device

log = logging.getLogger(__name__)
SELECTION_FILE = "selection.json"
TASK = "classification"
IDENTITY = ("key",)  # a record's key hashes its phase, method, hyperparameters, split and protocol


# ----------------------------------------------------------------------------------------------------- records


def run_record(
    result: UnlearnResult, *, scenario: str, seed: int, forget_class: int | None = None, key: str = "",
    phase: str = "test", bench: str = "", hyperparameters: Mapping[str, Any] | None = None, **extra: Any,
) -> dict[str, Any]:
    """An image run's record: the shared envelope, the metrics before and after, UIS, the split, and ``extra``."""
    final = {k: v for k, v in result.final.items() if k in ("forget", "retain", "test")}
    original = dict(result.original)
    score = None
    if "test" in original and "test" in final and scenario in SCENARIOS:
        score = uis(original_test=original["test"], unlearned_test=final["test"], unlearned_forget=final["forget"],
                    scenario=scenario)  # type: ignore[arg-type]  # a Scenario: checked against SCENARIOS above
    envelope = record_envelope(task=TASK, bench=bench, key=key, phase=phase, method=result.method,
                               label=result.method, hyperparameters=hyperparameters or {}, seed=seed, result=result)
    return {
        **envelope,
        "scenario": scenario,
        "forget_class": forget_class,
        "config": result.config,
        "original": original,
        "final": final,
        "uis": score,
        "data": result.data,  # fingerprints of the forget and retain sets (the split)
        **extra,
    }


def run_line(record: Mapping[str, Any]) -> str:
    """One line about a finished benchmark run (an image record, data-parallel ones too)."""
    final = record["final"]
    forget_class = record["forget_class"]
    split = f"class {forget_class}" if forget_class is not None else f"seed {record['seed']}"
    hyper = ", ".join(f"{name}={value}" for name, value in record["hyperparameters"].items())
    scored = "A_val" if record["evaluated_on"] == "validation" else "A_test"
    uis = "–" if record["uis"] is None else f"{record['uis']:.3f}"
    ranks = f" on {record['world_size']} ranks" if "world_size" in record else ""
    missed = ", missed the target" if record.get("target_reached") is False else ""
    return (
        f"{record['phase']:>5} {record['method']:<10} {split} retain {record['retain_size']} [{hyper}]: "
        f"A_u {final['forget']:.2f} {scored} {final['test']:.2f} UIS {uis} "
        f"({record['stop_reason']}{missed}, {record['steps']} steps, {record['wall_time_s']:.1f}s{ranks})"
    )



# ----------------------------------------------------------------------------------------- execution of one job


@dataclass
class BenchContext:
    """What every job of one config needs, built once per process."""

    config: BenchConfig
    data: BenchData
    original: torch.nn.Module
    device: torch.device
    # the original model's privacy metrics per split (every method of a split shares them): {split key: metrics}
    original_privacy: dict[str, dict[str, Any]] = field(default_factory=dict)


def _build_context(config: BenchConfig) -> BenchContext:
    device = resolve_device(None if config.device == "auto" else config.device)
    data = load_bench_data(config.data)
    original = ModelCache(config, data, device=device).original().model
    return BenchContext(config, data, original, device)


_CONTEXTS: ProcessCache[BenchContext] = ProcessCache(_build_context)  # every variant's, in this process


def bench_context(config: BenchConfig) -> BenchContext:
    """The data and the original model of ``config`` in this process (trained and cached on first use)."""
    return _CONTEXTS.get(config)


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
        split = make_split(config, ctx.data.train_labels, split_index=job.split["split_index"],
                           retain_size=job.split["retain_size"], phase=job.phase)
        seed = split_seed(config, job.split["split_index"], phase=job.phase)
        return cls(config, job, ctx, split, *split.datasets(ctx.data.train), seed)

    def unlearn_options(self, *, device: torch.device) -> dict[str, Any]:
        """Everything ``unlearn`` takes besides the model, the data and the evaluation set."""
        job, protocol = self.job, self.config.protocol
        return {
            "method": job.method,
            "stop": self.config.scenario.kind if protocol.stop else "never",
            **run_schedule(protocol, method=job.method, hyperparameters=job.hyperparameters,
                           forget_size=len(self.split.forget), has_rule=protocol.stop),
            "track": protocol.track,
            "device": device,
            "seed": self.seed,
            "verbose": False,
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
            key=job.digest,
            phase=job.phase,
            bench=self.config.name,
            hyperparameters=job.hyperparameters,
            evaluated_on="validation" if job.phase == "sweep" else "test",
            retain_size=job.split["retain_size"],
            forget_size=len(self.split.forget),
            target_reached=target_reached(self.config.scenario.kind, result.original, result.final)
            if self.config.protocol.stop else None,
            original_hash=self.config.original_hash(),
            device=str(device),
            **extra,
        )


def execute(config: BenchConfig, job: Job) -> dict[str, Any]:
    """Run one job and return its record (with the retrained reference and privacy metrics when known)."""
    inputs = JobInputs.of(config, job)
    ctx, split, seed = inputs.ctx, inputs.split, inputs.seed
    evaluation = ctx.data.validation if job.phase == "sweep" else ctx.data.test
    assert evaluation is not None  # a sweep requires data.validation_size > 0 (config check)
    options = inputs.unlearn_options(device=ctx.device)
    built: list[UnlearningMethod] = []

    def keep(cls: type[UnlearningMethod], method_config: MethodConfig, context: MethodContext) -> UnlearningMethod:
        built.append(cls(method_config, context))
        return built[-1]

    with PeakMemory(ctx.device) as memory:
        result = bench_unlearn(ctx.original, inputs.forget, inputs.retain, test=evaluation, make_method=keep,
                               **options)
    reference = job.extra.get("reference") or {}
    retrain_time = reference.get("train_time_s")
    record = inputs.record(
        result,
        device=ctx.device,
        split={"forget": indices_fingerprint(split.forget), "retain": indices_fingerprint(split.retain)},
        memory=memory.report(),
        eval_every=options["eval_every"],  # the stop-rule cadence this run had (bench.protocol)
        # the adaptive controller's raises, back-offs and holds (None: the method has no controller)
        controller_actions=getattr(built[0], "controller_actions", None) or None,
        efficiency=retrain_time / result.wall_time_s if retrain_time and result.wall_time_s > 0 else None,
    )
    if "accuracy" in reference:
        record["retrained"] = reference["accuracy"]
        record["gap_to_retrained"] = {
            k: record["final"][k] - v for k, v in reference["accuracy"].items() if k in record["final"]
        }
    if job.phase == "test" and config.protocol.privacy:
        record["privacy"] = privacy_metrics(
            result.model, forget=inputs.forget, retain=inputs.retain, test=evaluation, device=ctx.device, seed=seed,
            reference=reference.get("privacy"),
        )
        # the same attacks on the original model fill the Original row's MIA columns (once per split and seed)
        split_key = f"{record['split']['forget']}-{record['split']['retain']}-{seed}"
        if split_key not in ctx.original_privacy:
            ctx.original_privacy[split_key] = privacy_metrics(ctx.original, forget=inputs.forget, retain=inputs.retain,
                                                              test=evaluation, device=ctx.device, seed=seed)
        record["privacy"]["original"] = dict(ctx.original_privacy[split_key])
    return record


def execute_data_parallel(config: BenchConfig, job: Job, *, device: torch.device) -> dict[str, Any]:
    """Run one test job as ``unlearn_distributed`` on this rank's ``device``; returns its record (on every rank;
    the torchrun executor adds ``world_size``)."""
    from orthograd.distributed.runner import unlearn_distributed  # torch.distributed, for the ddp backend only

    inputs = JobInputs.of(config, job)
    result = unlearn_distributed(inputs.ctx.original, inputs.forget, inputs.retain, test=inputs.ctx.data.test,
                                 **inputs.unlearn_options(device=device))
    return inputs.record(result, device=device)


RunJob = Callable[[BenchConfig, Job], dict[str, Any]]


# ------------------------------------------------------------------------------------- older logs (bench.upgrade)

# Settings added after the first logs, left out of a format-2 key at the value that kept the earlier behaviour.
_LATER_DEFAULTS: dict[str, Any] = {"track": "all", "fuse_passes": False, "privacy": True}


def rekey_format2(config: BenchConfig, record: Mapping[str, Any], old_key: str) -> dict[str, Any] | None:
    """``bench.upgrade``'s rule for image records: the key and ``original_hash`` of the job read off ``record``
    (fields renamed) when that job's format-2 key is ``old_key``, else None. Format 2 hashed the resolved
    hyperparameters with LoRA's ``lora_alpha`` as ``alpha``, left out ``_LATER_DEFAULTS`` at their value, and
    hashed the original model's settings without ``train.init_seed`` when it was unset."""
    index = _split_index(config, record)
    if index is None:
        return None
    job = {"phase": record["phase"], "method": record.get("method"), "hyperparameters": record.get("hyperparameters"),
           "split_index": index, "retain_size": record.get("retain_size")}
    try:
        payload = job_payload(config, **job)
    except (KeyError, TypeError, ValueError):  # settings no method has now: no job of this config made the record
        return None
    train = config.train.model_dump(mode="json", exclude={"init_seed"} if config.train.init_seed is None else None)
    original = content_hash({"data": config.data.model_dump(mode="json"),
                             "model": config.model.model_dump(mode="json"), "train": train})
    format2 = {**payload, "hyperparameters": _without_later_defaults(lora_named(payload["hyperparameters"], "alpha")),
               "original": original, "unlearn": _without_later_defaults(payload["unlearn"])}
    if content_hash(format2) != old_key:
        return None
    return {"key": job_key(config, **job), "original_hash": config.original_hash()}


def _split_index(config: BenchConfig, record: Mapping[str, Any]) -> int | None:
    """The split index of the job that made an image record (from its phase and seed, or its class)."""
    seed, scenario = record.get("seed"), config.scenario
    if record.get("phase") == SWEEP:
        if not config.gridded() or not isinstance(seed, int):
            return None
        index = seed - config.tuning.seed - 1
        return index if 0 <= index < config.tuning.splits else None
    if record.get("phase") != "test":
        return None
    if scenario.kind == "random":
        seeds = config.protocol.seeds
        return seeds.index(seed) if seed in seeds else None
    forget_class = record.get("forget_class")
    return scenario.classes.index(forget_class) if forget_class in scenario.classes else None


def _without_later_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in _LATER_DEFAULTS or v != _LATER_DEFAULTS[k]}


# ------------------------------------------------------------------------------------------------ the experiment


class ImageExperiment:
    """The jobs of one image config (or of each of its variants): plan, run one, describe, tabulate.

    ``run_job(config, job)`` (default: ``execute``) runs one job; ``data_parallel`` swaps in the data-parallel one.
    """

    def __init__(self, configs: BenchConfig | Sequence[BenchConfig], *, run_job: RunJob = execute) -> None:
        self.configs = [configs] if isinstance(configs, BenchConfig) else list(configs)
        self._run_job = run_job
        self._selections: dict[int, dict[str, Any]] = {}  # per variant with a sweep: the choice and every score

    def setup(self) -> None:
        for config in self.configs:
            bench_context(config)

    def plan(self, finished: FinishedRuns) -> Iterator[Phase]:
        """Per variant: the sweep (when configured: every method's trials, then once more for the methods whose
        choice lies on the edge of a knob), then the test runs with the chosen hyperparameters."""
        for variant, config in enumerate(self.configs):
            references = self._references(config) if config.scenario.retrain else {}
            chosen = {label: (row.method, config.params(row)) for label, row in config.methods.items()}
            if config.gridded():
                check_disjoint(config, bench_context(config).data.train_labels)
                sweep = _Sweep(config, partial(self._job, config, variant, SWEEP))
                yield Phase(SWEEP, sweep.first_jobs())
                extended = sweep.extend(finished)
                if extended:
                    yield Phase("sweep, edges extended", extended)
                self._selections[variant] = sweep.selection(finished)
                chosen.update({row.label: (row.method, self._selections[variant][row.label]["hyperparameters"])
                               for row in config.gridded()})
            yield Phase("test", self._test_jobs(config, variant, chosen, references))

    def run_job(self, job: Job) -> dict[str, Any]:
        return self._run_job(self.configs[job.extra.get("variant", 0)], job)

    def data_parallel(self, device: torch.device) -> ImageExperiment:
        """The test runs as ``unlearn_distributed`` across torchrun's ranks, this rank on ``device``; without the
        sweep, the retrained reference and the privacy metrics (the other backends run those)."""
        test_only = [config.model_copy(update={
            "methods": {label: row.model_copy(update={"grid": {}}) for label, row in config.methods.items()},
            "scenario": config.scenario.model_copy(update={"retrain": False})}) for config in self.configs]
        return ImageExperiment(test_only, run_job=partial(execute_data_parallel, device=device))

    def record_key(self, record: Mapping[str, Any]) -> str:
        return record_key(record, IDENTITY)

    def describe(self, record: Mapping[str, Any]) -> str:
        return run_line(record)

    def write_tables(self, records: Sequence[Mapping[str, Any]], out_dir: Path) -> Path | None:
        """The report of the test runs (``image_bench.report``) and each sweep's selection (``selection.json``)."""
        for variant, selection in self._selections.items():
            name = SELECTION_FILE if len(self.configs) == 1 else f"selection_variant{variant}.json"
            atomic_write_json(out_dir / name, selection)
        tested = [r for r in records if r.get("phase") == "test"]
        return report_records(tested, out_dir=out_dir)["table"] if tested else None

    # -- planning

    @staticmethod
    def _splits(config: BenchConfig) -> Iterator[tuple[int, int]]:
        for retain_size in config.scenario.retain_size:
            for index in range(n_splits(config)):
                yield index, retain_size

    @staticmethod
    def _job(config: BenchConfig, variant: int, phase: str, method: str, hyper: dict[str, Any], index: int,
             retain_size: int, reference: dict[str, Any] | None = None) -> Job:
        key = job_key(config, phase=phase, method=method, hyperparameters=hyper, split_index=index,
                      retain_size=retain_size)
        return Job(phase=phase, label=method, method=method, hyperparameters=hyper,
                   seed=split_seed(config, index, phase=phase), digest=key,
                   split={"split_index": index, "retain_size": retain_size},
                   extra={"variant": variant, "reference": reference})

    def _test_jobs(self, config: BenchConfig, variant: int, chosen: Mapping[str, tuple[str, dict[str, Any]]],
                   references: Mapping[tuple[int, int], Any]) -> list[Job]:
        return [
            self._job(config, variant, "test", method, hyper, index, retain_size,
                      references.get((index, retain_size)))
            for index, retain_size in self._splits(config)
            for method, hyper in chosen.values()
        ]

    def _references(self, config: BenchConfig) -> dict[tuple[int, int], dict[str, Any]]:
        """Per split: the retrained model's accuracies, privacy metrics and training time (trained once, cached)."""
        ctx = bench_context(config)
        cache = ModelCache(config, ctx.data, device=ctx.device)
        out: dict[tuple[int, int], dict[str, Any]] = {}
        for index, retain_size in self._splits(config):
            split = make_split(config, ctx.data.train_labels, split_index=index, retain_size=retain_size)
            trained = cache.retrained(split.forget)
            forget, retain = split.datasets(ctx.data.train)
            model = trained.model.to(ctx.device)
            sets = {"forget": forget, "retain": retain, "test": ctx.data.test}
            out[(index, retain_size)] = {
                "train_time_s": trained.train_time_s,
                "accuracy": {name: evaluate(model, data, device=ctx.device)["accuracy"] for name, data in sets.items()},
                "privacy": privacy_metrics(model, forget=forget, retain=retain, test=ctx.data.test, device=ctx.device,
                                           seed=split_seed(config, index)),
            }
        return out


class _Sweep:
    """One variant's tuning: every gridded row's search (``bench.protocol.Search``: its trials on the validation
    splits, the one edge extension) and the choice (``select``: lowest mean validation UIS; ties: the first trial).
    Keyed by row label."""

    def __init__(self, config: BenchConfig, job: Callable[..., Job]) -> None:
        self.config = config
        self.tuning = config.tuning
        self.rows = {row.label: row for row in config.gridded()}
        self.retain_size = config.tuning.retain_size or config.scenario.retain_size[0]
        self.size = max(grid_size(row.grid) for row in self.rows.values())
        self._job = job
        self.searches = {label: Search(label, row.grid, size=self.size, extend=self.tuning.extend_edges,
                                       accepts=method_accepts(row.method, config.params(row)))
                         for label, row in self.rows.items()}

    def _jobs(self, label: str, points: Sequence[Mapping[str, Any]]) -> list[Job]:
        row = self.rows[label]
        return [self._job(row.method, {**self.config.params(row), **point}, index, self.retain_size)
                for point in points for index in range(self.tuning.splits)]

    def first_jobs(self) -> list[Job]:
        return [job for label, search in self.searches.items() for job in self._jobs(label, search.rounds[0])]

    def _scored(self, label: str, finished: FinishedRuns) -> list[dict[str, Any]]:
        """Every trial of ``label`` so far: its point, round, per-split UIS and whether each split met the target."""
        out = []
        for round_index, point in self.searches[label].tried():
            runs = [finished[job.key] for job in self._jobs(label, [point])]
            values = [float("inf") if r["uis"] is None else r["uis"] for r in runs]
            out.append({
                "hyperparameters": {**self.config.params(self.rows[label]), **point}, "round": round_index,
                "validation_uis": statistics.fmean(values), "per_split_uis": [r["uis"] for r in runs],
                "target_reached": all(r.get("target_reached") is not False for r in runs),
            })
        return out

    def _best(self, label: str, finished: FinishedRuns) -> dict[str, Any]:
        return select(self._scored(label, finished), score=lambda trial: trial["validation_uis"])

    def extend(self, finished: FinishedRuns) -> list[Job]:
        """The jobs of the shifted grids of the rows whose choice lies on an edge (none: no second round)."""
        return [job for label, search in self.searches.items()
                for job in self._jobs(label, search.extension(self._best(label, finished)["hyperparameters"]))]

    def selection(self, finished: FinishedRuns) -> dict[str, Any]:
        """What ``selection.json`` holds: per row its choice, every trial and its edges; the rule (``protocol``)."""
        rows_out = {}
        for label, search in self.searches.items():
            best = self._best(label, finished)
            rows_out[label] = {
                "hyperparameters": best["hyperparameters"], "validation_uis": best["validation_uis"],
                "target_reached": best["target_reached"], "trials": self._scored(label, finished),
                **search.summary(best["hyperparameters"]),
            }
        protocol = {
            "rule": f"grid padded to {self.size} trials per method, one edge extension (bench.protocol); lowest mean "
                    "validation UIS",
            "trials_per_method": self.size,
            "validation_splits": self.tuning.splits,
            "retain_size": self.retain_size,
        }
        return {**rows_out, "protocol": protocol}
