"""The TOFU-style benchmark as an experiment of the engine (``bench.engine``): its jobs, phases, keys and records.

Per forget fraction, gridded runs are first tuned on a validation split of other authors (``llm_bench.tuning``):
a phase with the split's Original and Retrain records and every grid point (first seed), from whose records the
next phase, the test split, takes each run's chosen values for every seed. The engine runs what is not logged yet
and writes the results log; each job measures one model (``llm_bench.workbench``) into one record.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from orthograd.bench.config import MethodRow, content_hash
from orthograd.bench.engine import FinishedRuns, Phase
from orthograd.bench.jobs import Job, record_key
from orthograd.bench.protocol import Search, UnlearnRun, bench_unlearn, grid_size, method_accepts
from orthograd.bench.records import Record, record_envelope
from orthograd.bench.upgrade import hash_format2, lora_named
from orthograd.data.authors import forget_authors
from orthograd.io import atomic_write_json, atomic_write_text
from orthograd.llm_bench.config import TASK, AuthorsBenchConfig
from orthograd.llm_bench.plots import plot_tradeoff
from orthograd.llm_bench.tables import authors_tables, record_line
from orthograd.llm_bench.tuning import choose, validation_authors
from orthograd.llm_bench.workbench import workbench
from orthograd.tasks.causal_lm import DEFAULT_MAX_NEW_TOKENS

log = logging.getLogger(__name__)
REFERENCES = {"original": "Original", "retrain": "Retrain"}  # method -> label of the records that only measure


# a record's key (``record_digest``) hashes its label, params and forget authors; its seeds share it
IDENTITY = ("phase", "fraction", "label", "seed", "key")


class AuthorsExperiment:
    """The benchmark of one config (``AuthorsBenchConfig``) for the engine; holds only the config and a function (it
    is pickled).

    ``unlearn`` (default: ``bench_unlearn``) makes each run; ``data_parallel`` swaps in the data-parallel one."""

    def __init__(self, config: AuthorsBenchConfig, *, unlearn: UnlearnRun = bench_unlearn) -> None:
        self.config = config
        self.unlearn = unlearn
        self.selection: dict[str, Any] = {}  # per forget fraction: each gridded run's trials and choice

    def setup(self) -> None:
        """The corpus, the original model and every split's retrained reference, trained here (once, then stored)
        so that worker processes only load them."""
        bench = workbench(self.config)
        for _, _, authors in self.splits():
            bench.split(authors)

    def plan(self, finished: FinishedRuns) -> Iterator[Phase]:
        """Per forget fraction: the validation phase (when any run has a grid: every gridded row's search,
        ``bench.protocol.Search``, once more for the rows whose choice lies on an edge), then the test phase with
        the values each gridded row kept on validation."""
        config = self.config
        chosen: dict[str, dict[str, Any]] = {}
        for phase, fraction, authors in self.splits():
            references = [self._job(phase, fraction, authors, label, method, {}, None)
                          for method, label in REFERENCES.items()]
            if phase == "validation":
                chosen = yield from self._validation(fraction, authors, references, finished)
            else:
                runs = [self._run(phase, fraction, authors, spec, chosen.get(spec.label, {}), seed)
                        for spec in config.methods.values() for seed in config.protocol.seeds]
                yield Phase(f"test, forget {100 * fraction:g}%", [*references, *runs])

    def _validation(self, fraction: float, authors: tuple[int, ...], references: Sequence[Job],
                    finished: FinishedRuns) -> Generator[Phase, None, dict[str, dict[str, Any]]]:
        """The validation phases of one forget fraction; returns each gridded row's kept values."""
        config = self.config
        rows = {spec.label: spec for spec in config.gridded()}
        size = max(grid_size(spec.grid) for spec in rows.values())  # every tuned row: as many trials
        searches = {label: Search(label, spec.grid, size=size, extend=config.tuning.extend_edges,
                                  accepts=method_accepts(spec.method, config.params(spec)))
                    for label, spec in rows.items()}

        def jobs(label: str, points: Sequence[dict[str, Any]]) -> list[Job]:
            return [self._run("validation", fraction, authors, rows[label], point, config.protocol.seeds[0])
                    for point in points]

        def scored(label: str) -> list[tuple[int, dict[str, Any], Record]]:
            points = searches[label].tried()
            runs = jobs(label, [point for _, point in points])
            return [(index, point, finished[job.key]) for (index, point), job in zip(points, runs, strict=True)]

        def best(label: str) -> dict[str, Any]:
            return choose([(point, record) for _, point, record in scored(label)],
                          original_utility=finished[references[0].key]["model_utility"],
                          keep_utility=config.tuning.keep_utility)

        first = [job for label, search in searches.items() for job in jobs(label, search.rounds[0])]
        yield Phase(f"validation, forget {100 * fraction:g}%", [*references, *first])
        extended = [job for label, search in searches.items() for job in jobs(label, search.extension(best(label)))]
        if extended:
            yield Phase(f"validation, edges extended, forget {100 * fraction:g}%", extended)
        chosen = {label: best(label) for label in searches}
        for label, values in chosen.items():
            log.info("validation: %s keeps %s", label, values)
        self.selection[f"{fraction:g}"] = {label: self._selected(searches[label], chosen[label], scored(label))
                                           for label in searches}
        return chosen

    @staticmethod
    def _selected(search: Search, chosen: dict[str, Any], scored: Sequence[tuple[int, dict[str, Any], Record]],
                  ) -> dict[str, Any]:
        """A row's ``selection.json`` entry: the kept values and every trial (with its round and the search's
        edges when the search extends)."""
        measured = ("forget_quality", "model_utility", "missed_target", "damaged")
        if not search.extend:
            return {"chosen": chosen, "trials": [{"params": point, **{k: record.get(k) for k in measured}}
                                                 for _, point, record in scored]}
        return {"chosen": chosen, "trials": [{"params": point, "round": index, **{k: record.get(k) for k in measured}}
                                             for index, point, record in scored], **search.summary(chosen)}

    def run_job(self, job: Job) -> Record:
        """Measure the job's model on its split: the original, the retrained reference, or a run from the original."""
        bench = workbench(self.config)
        split = bench.split(job.split["authors"])
        result = None
        if job.method == "original":
            model = bench.original
        elif job.method == "retrain":
            model = split.retrained
        else:
            assert job.seed is not None, "every unlearning run has a seed"
            log.info("%s split, forget %.0f%%: %s, seed %d", job.phase, 100 * job.split["fraction"], job.label,
                     job.seed)
            result = bench.unlearn(split, method=job.method, params=dict(job.hyperparameters), seed=job.seed,
                                   run=self.unlearn)
            model = result.model
        envelope = record_envelope(task=TASK, bench=self.config.name, key=job.digest, phase=job.phase,
                                   method=job.method, label=job.label, hyperparameters=job.hyperparameters,
                                   seed=job.seed, result=result)
        return {**envelope, "fraction": job.split["fraction"], **bench.measure(model, split)}

    def data_parallel(self, device: torch.device) -> AuthorsExperiment:
        """Every job on torchrun's ranks, this rank's models on ``device``: each run as ``unlearn_distributed``, the
        measurements (TOFU's metrics, the attacks, relearning) whole on every rank (``bench.data_parallel``)."""
        from orthograd.bench.data_parallel import on_rank_device, unlearn_on_ranks  # torch.distributed: ddp only

        return AuthorsExperiment(on_rank_device(self.config, device), unlearn=unlearn_on_ranks)

    def record_key(self, record: Mapping[str, Any]) -> str:
        """A record's identity: its phase, forget fraction, label, seed and ``key`` field."""
        return record_key(record, IDENTITY)

    def describe(self, record: Mapping[str, Any]) -> str:
        """``tables.record_line``: what the CLI prints as each record is logged."""
        return record_line(record)

    def write_tables(self, records: Sequence[Mapping[str, Any]], out_dir: Path) -> Path:
        """``tables.md`` (``authors_tables``), ``tradeoff.png`` (``plot_tradeoff``) and ``selection.json`` (every
        validation trial and the kept values)."""
        if self.selection:
            atomic_write_json(out_dir / "selection.json", self.selection)
        path = out_dir / "tables.md"
        atomic_write_text(path, authors_tables(records, title=self.config.name, notes=table_notes(self.config)))
        if any(r["phase"] == "test" for r in records):  # the figure shows test splits; a run under way may have none
            plot_tradeoff(records, path=out_dir / "tradeoff.png", title=self.config.name)
        return path

    def splits(self) -> Iterator[tuple[str, float, tuple[int, ...]]]:
        """(phase, fraction, forget authors) of every split, in plan order: per fraction its validation split (when
        any run has a grid), then its test split."""
        config, scenario = self.config, self.config.scenario
        for fraction in scenario.forget_fractions:
            if config.gridded():
                yield "validation", fraction, tuple(sorted(validation_authors(config, fraction=fraction)))
            tested = forget_authors(config.corpus.authors, fraction=fraction, seed=scenario.split_seed)
            yield "test", fraction, tuple(sorted(tested))

    def _run(self, phase: str, fraction: float, authors: tuple[int, ...], spec: MethodRow, values: dict[str, Any],
             seed: int) -> Job:
        """The job of ``spec`` with ``values`` over its own and the shared defaults."""
        params = {**self.config.params(spec), **values}
        return self._job(phase, fraction, authors, spec.label, spec.method, params, seed)

    def _job(self, phase: str, fraction: float, authors: tuple[int, ...], label: str, method: str,
             params: dict[str, Any], seed: int | None) -> Job:
        return Job(phase=phase, label=label, method=method, hyperparameters=params, seed=seed,
                   digest=record_digest(self.config, label=label, params=params, authors=authors),
                   split={"fraction": fraction, "authors": authors}, identity=IDENTITY)


def record_digest(config: AuthorsBenchConfig, *, label: str, params: Mapping[str, Any], authors: Sequence[int]) -> str:
    """A record's ``key`` field: a hash of everything that changes its numbers (the config but how it runs, its runs
    and tuning, which only pick ``params``; the forget authors), so a rerun resumes and a changed grid reruns only
    what it changes. Not the seed: the engine's key adds it (``bench.jobs.Job.key``)."""
    return content_hash({"config": _hashed_settings(config), "label": label, "params": dict(params),
                         "forget": list(authors)})


def _hashed_settings(config: AuthorsBenchConfig) -> dict[str, Any]:
    """The settings a record's key hashes: every section but how the jobs run, the rows and the tuning, and the
    model's device; under the names of the keys already logged (the scenario as ``protocol``, the protocol as
    ``unlearning``; ``eval_every`` only when set), so they stay valid."""
    unlearning = config.protocol.model_dump(exclude={"eval_every"} if config.protocol.eval_every is None else None)
    return {
        "task": config.task,
        "corpus": config.corpus.model_dump(),
        "model": config.model.model_dump(exclude={"device"}),
        "pretraining": config.pretraining.model_dump(),
        "training": config.training.model_dump(),
        "protocol": config.scenario.model_dump(),
        "evaluation": config.evaluation.model_dump(),
        "unlearning": unlearning,
    }


def rekey_format2(config: AuthorsBenchConfig, record: Mapping[str, Any], old_key: str) -> dict[str, Any] | None:
    """``bench.upgrade``'s rule for language-model records: the current key of the record's split, label and
    hyperparameters when their format-2 key is ``old_key``, else None. Format 2 hashed ``record_digest``'s payload
    as sorted JSON with spaces (LoRA's scaling as the config wrote it: ``alpha`` or ``lora_alpha``)."""
    splits: dict[tuple[Any, Any], tuple[int, ...]] = {
        (phase, fraction): authors for phase, fraction, authors in AuthorsExperiment(config).splits()}
    authors = splits.get((record.get("phase"), record.get("fraction")))
    if authors is None:
        return None
    label, params = str(record.get("label")), dict(record.get("hyperparameters") or {})
    spec = _hashed_settings(config)
    for written in (params, lora_named(params, "alpha")):
        payload = {"config": spec, "label": label, "params": written, "forget": list(authors)}
        if hash_format2(payload, length=16, sort_keys=True) == old_key:
            return {"key": record_digest(config, label=label, params=params, authors=authors)}
    return None


def table_notes(config: AuthorsBenchConfig) -> list[str]:
    """What a reader of the tables must know about this config's departures from TOFU's evaluation."""
    evaluation, notes = config.evaluation, []
    if evaluation.max_new_tokens != DEFAULT_MAX_NEW_TOKENS:
        notes.append(f"Greedy answers (ROUGE-L) are cut at {evaluation.max_new_tokens} new tokens, not TOFU's "
                     f"{DEFAULT_MAX_NEW_TOKENS}, to bound CPU time; every answer here is far shorter.")
    notes.append(budget_note(config))
    if evaluation.relearn_steps:
        notes.append(f"Relearning: {evaluation.relearn_steps} AdamW steps (lr {evaluation.relearn_lr:g}, batch "
                     f"{evaluation.relearn_batch_size}) on the forget authors' {', '.join(evaluation.relearn_facts)} "
                     "questions; measured on their other facts.")
    return notes


def budget_note(config: AuthorsBenchConfig) -> str:
    """The stop rule, cadence and budget every method of ``config`` ran under, in words."""
    setup = config.protocol
    caps = [f"{setup.max_steps} optimizer steps" if setup.max_steps else "",
            f"{setup.max_epochs} epochs over the forget set (Finetune: the retain set)" if setup.max_epochs else ""]
    budget = " or ".join(cap for cap in caps if cap) + ", whichever ends first"
    if setup.stop == "never":
        return f"Budget: {budget}, for every method, no early stop; Steps counts each run's optimizer steps."
    rule = {"never_seen": "its forget answers are no more likely than the never-trained holdout authors' (within "
                          "half a point of their answer probability under the original model)",
            "truth_ratio": "its forget truth ratios are indistinguishable from the holdout authors' (KS p >= 0.05)"}
    return (f"Every method stops once {rule[setup.stop]}, checked {setup.checks_per_epoch} times per pass over "
            f"the forget set and after every epoch, within a budget of {budget}. Reached counts the runs that "
            "reached that target; † marks a row where some did not (its numbers are the budget's end).")

