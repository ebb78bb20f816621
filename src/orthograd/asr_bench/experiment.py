"""Speaker unlearning as an engine experiment: corpus -> original Whisper -> (validation runs) -> test runs -> records.

Every run is scored on the forget, retain, held-out and test utterances and, when the corpus has them, on the
validation voices (``W_val``). A grid's variant is chosen in a validation phase of its own: each variant unlearns
the validation speakers (training speakers that are never tested, whose utterances are in no test run's retain set,
and whose runs retain nothing of a test run), and the variant with the lowest mean W_val among those that reach the
WER target on every validation speaker is the one that then unlearns the test speakers (``choose_variants``).

The original model is made once (fine-tuned on the training speakers, each speaker's held-out 10% excluded so that
W_speaker is measured on recordings the model never saw) and stored in the run folder (``bench.model_store``).
Every run starts from it through ``orthograd.unlearn`` with the same LoRA seed, evaluation schedule and stopping
rule (W_unlearn >= target). ``run`` hands the experiment to the engine (``bench.engine``), which logs each record to
``RUN_DIR/results.jsonl`` as it finishes (an interrupted benchmark resumes where it stopped), runs the jobs in
``workers`` processes and writes ``tables.md`` at the end.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from orthograd.asr_bench.config import RunSpec, SpeakerBenchConfig
from orthograd.asr_bench.corpus import SpeakerCorpus, build_corpus
from orthograd.asr_bench.tables import speaker_tables
from orthograd.bench.config import content_hash
from orthograd.bench.engine import FinishedRuns, Phase
from orthograd.bench.jobs import Job, ProcessCache, record_key
from orthograd.bench.model_store import ModelStore
from orthograd.bench.protocol import Search, UnlearnRun, bench_unlearn, method_accepts, run_schedule, select, trials
from orthograd.bench.records import record_envelope
from orthograd.bench.upgrade import hash_format2, lora_named
from orthograd.data.audio import SpeechDataset
from orthograd.data.librispeech import SpeakerSplit, Utterance, pick_speakers, speaker_unlearning_split, speakers_of
from orthograd.io import atomic_write_json, atomic_write_text
from orthograd.models.whisper import load_whisper, set_input_window
from orthograd.runtime import resolve_device
from orthograd.stopping import wer_target_rule
from orthograd.tasks.asr import ASRTask
from orthograd.training import train_model

log = logging.getLogger(__name__)
Record = dict[str, Any]
TASK = "asr"
PHASE = "test"
VALIDATION = "validation"  # the phase that chooses a grid's variant, on the validation speakers
ORIGINAL = "Original"


IDENTITY = ("speaker", "variant", "key")  # a record's key hashes everything but its speaker


def settings_key(config: SpeakerBenchConfig, variant: str, params: Mapping[str, Any]) -> str:
    """What determines a record besides its speaker: the data, model and protocol settings (not where it runs:
    ``model.device``), the variant and the run's hyperparameters. ``checks_per_epoch`` only when it acts (a stop
    rule and no ``eval_every``), ``max_steps`` and the validation speakers' seed only when set (and other than
    ``speakers.seed + 1``); the payload's names (``protocol`` for the scenario, ``unlearning``, ``stop_wer``) are
    those of the keys already logged, so they stay valid."""
    protocol = config.protocol
    unlearning: dict[str, Any] = {"max_epochs": protocol.max_epochs, "stop_wer": protocol.stop,
                                  "eval_every": protocol.eval_every, "track": protocol.track, "seed": run_seed(config)}
    if protocol.eval_every is None and protocol.stop is not None:
        unlearning["checks_per_epoch"] = protocol.checks_per_epoch
    if protocol.max_steps is not None:
        unlearning["max_steps"] = protocol.max_steps
    payload = {
        "corpus": config.corpus.model_dump(mode="json"),
        "model": config.model.model_dump(mode="json", exclude={"device"}),
        "original": config.original.model_dump(mode="json"),
        "protocol": config.scenario.model_dump(mode="json"),
        "unlearning": unlearning,
        "validation_speakers": config.tuning.splits,  # the test runs' retain sets leave them out
        "variant": variant,
        "params": dict(params),
    }
    if config.tuning.splits and config.tuning.seed != config.speakers.seed + 1:
        payload["validation_seed"] = config.tuning.seed
    return content_hash(payload)


def run_seed(config: SpeakerBenchConfig) -> int:
    """The seed every run unlearns with (``protocol.seeds``' one)."""
    return config.protocol.seeds[0]


def rekey_format2(config: SpeakerBenchConfig, record: Mapping[str, Any], old_key: str) -> dict[str, Any] | None:
    """``bench.upgrade``'s rule for speech records: the current key of the config's job of the record's variant when
    that job's format-2 key is ``old_key``, else None. Format 2 hashed a list (the sections' ``repr``, the protocol,
    the variant, the sorted params; ``track`` only when not "all") as unsorted JSON with spaces, 12 hex digits."""
    protocol = config.protocol
    jobs: list[tuple[str, dict[str, Any]]] = [(ORIGINAL, {})]
    for spec in config.rows():
        variants = spec.expand(size=config.grid_size()) if spec.grid else spec.expand()
        jobs += [(variant, {**protocol.defaults, **params}) for variant, params in variants]
    base = old_key.removesuffix("-validation")
    suffix = old_key[len(base):]
    for variant, params in jobs:
        if variant != record.get("variant"):
            continue
        payload: list[Any] = [
            *_format2_reprs(config), protocol.max_epochs, protocol.stop, protocol.eval_every, run_seed(config),
            variant, sorted(params.items(), key=lambda kv: kv[0]),
        ]
        if protocol.track != "all":
            payload.append(protocol.track)
        if protocol.eval_every is None and protocol.stop is not None:
            payload.append({"checks_per_epoch": protocol.checks_per_epoch})
        if config.tuning.splits:
            payload.append({"validation_speakers": config.tuning.splits})
        if hash_format2(payload, length=12, sort_keys=False) == base:
            return {"key": settings_key(config, variant, lora_named(params, "lora_alpha")) + suffix}
    return None


def _format2_reprs(config: SpeakerBenchConfig) -> list[str]:
    """The ``repr`` of the corpus, model, original and split sections as format 2 hashed them (the split section
    was named ``ProtocolConfig`` then)."""
    scenario = repr(config.scenario).replace("ScenarioConfig(", "ProtocolConfig(", 1)
    return [repr(config.corpus), repr(config.model), repr(config.original), scenario]


Chosen = Mapping[str, tuple[str, Mapping[str, Any]]]  # label -> (variant, params) of each gridded run


def _job(config: SpeakerBenchConfig, speaker: str, spec: RunSpec | None, variant: str, params: Mapping[str, Any],
         *, phase: str = PHASE) -> Job:
    """The job of one variant of a row (``spec``; None: the Original row, which measures the original model) for
    ``speaker``; its digest is ``settings_key`` (validation runs: with a ``-validation`` suffix)."""
    label, method, tables = (spec.label, spec.method, spec.tables) if spec else (ORIGINAL, "original", [1, 2])
    params = {**config.protocol.defaults, **params} if spec else {}
    key = settings_key(config, variant, params) + ("-validation" if phase == VALIDATION else "")
    return Job(phase=phase, label=label, method=method, hyperparameters=params,
               seed=run_seed(config) if spec else None, digest=key, split={"speaker": speaker, "variant": variant},
               identity=IDENTITY, extra={"tables": tuple(tables)})


def plan_jobs(config: SpeakerBenchConfig, speakers: Sequence[str], chosen: Chosen) -> list[Job]:
    """Per test speaker, the Original row and then every run in config order, a gridded one with its ``chosen``
    variant (needs no corpus or model)."""
    jobs = []
    for speaker in speakers:
        jobs.append(_job(config, speaker, None, ORIGINAL, {}))
        for spec in config.rows():
            variant, params = chosen.get(spec.label, (spec.label, spec.params))
            jobs.append(_job(config, speaker, spec, variant, params))
    return jobs


Points = Mapping[str, Sequence[tuple[int, Mapping[str, Any]]]]  # label -> (round, grid point) of each trial


def searches(config: SpeakerBenchConfig) -> dict[str, Search]:
    """Every tuned row's search (``bench.protocol.Search``) over its grid, names sorted as its variants name them."""
    return {spec.label: Search(spec.label, spec.sorted_grid(), size=config.grid_size(),
                               extend=config.tuning.extend_edges,
                               accepts=method_accepts(spec.method, {**config.protocol.defaults, **spec.params}))
            for spec in config.tuned_rows()}


def plan_validation_jobs(config: SpeakerBenchConfig, speakers: Sequence[str],
                         points: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> list[Job]:
    """Every variant of every gridded run on every validation speaker (``points``: these grid points per row;
    default: every row's first round)."""
    return [_job(config, speaker, spec, variant, params, phase=VALIDATION)
            for spec in config.tuned_rows()
            for variant, params in ([spec.variant(p) for p in points.get(spec.label, [])] if points is not None
                                    else spec.expand(size=config.grid_size()))
            for speaker in speakers]


def choose_variants(config: SpeakerBenchConfig, records: Sequence[Mapping[str, Any]],
                    tried: Points | None = None) -> dict[str, dict[str, Any]]:
    """Per gridded run, from its validation records of the ``tried`` points (default: the first round's): the
    variant with the lowest mean W_val among those whose W_unlearn reached the target on every validation speaker,
    else (``fallback``) the highest mean W_unlearn; with every variant's figures (what ``selection.json`` holds)."""
    target = config.protocol.stop
    out: dict[str, dict[str, Any]] = {}
    for spec in config.tuned_rows():
        points = tried[spec.label] if tried is not None else [
            (1, point) for point in trials(spec.sorted_grid(), size=config.grid_size(), seed=spec.label)]
        trials_out: list[dict[str, Any]] = []
        for index, point in points:
            variant, params = spec.variant(point)
            rows = [r for r in records if r["label"] == spec.label and r["variant"] == variant]
            trials_out.append({
                "variant": variant, "params": params, "point": dict(point), "round": index,
                "W_val": statistics.fmean(r["W_val"] for r in rows),
                "W_unlearn": statistics.fmean(r["W_unlearn"] for r in rows),
                "reached": target is not None and all(r["W_unlearn"] >= target for r in rows),
                "speakers": sorted(r["speaker"] for r in rows),
            })
        best = select(trials_out, score=lambda t: (0, t["W_val"]) if t["reached"] else (1, -t["W_unlearn"]))
        out[spec.label] = {**best, "fallback": not best["reached"], "trials": trials_out}
    return out


# ------------------------------------------------------------------------------------------- per-process context


@dataclass(frozen=True)
class _Context:
    """What every job of one config reads: the corpus, the original model and the speakers to unlearn."""

    task: ASRTask
    corpus: SpeakerCorpus
    original: torch.nn.Module
    device: torch.device
    speakers: list[str]
    validation_speakers: list[str]


def _build_context(config: SpeakerBenchConfig) -> _Context:
    """Corpus synthesis and the original model (fine-tuned and stored on first use)."""
    device = resolve_device(config.model.device)
    model, text = load_whisper(config.model.source)
    set_input_window(model, seconds=config.model.window_s)
    task = ASRTask(text=text, max_new_tokens=config.model.max_new_tokens)
    corpus = build_corpus(config.corpus, window_s=config.model.window_s)
    speakers = config.speakers.names or pick_speakers(
        corpus.train, count=config.speakers.count, seed=config.speakers.seed
    )
    original = _original_model(config, model, task, corpus, device=device)
    return _Context(task, corpus, original, device, list(speakers), validation_speakers(config, corpus.train, speakers))


# one config at a time: a Whisper per config would pile up in a long-lived process
_CONTEXT: ProcessCache[_Context] = ProcessCache(_build_context, keep=1)


def _context(config: SpeakerBenchConfig) -> _Context:
    """The config's context in this process (built on first use)."""
    return _CONTEXT.get(config)


def validation_speakers(config: SpeakerBenchConfig, train: Sequence[Utterance], tested: Sequence[str]) -> list[str]:
    """``tuning.splits`` training speakers that are not tested (drawn with ``tuning.seed``)."""
    count = config.tuning.splits
    if count == 0:
        return []
    others = [u for u in train if u.speaker not in set(tested)]
    return pick_speakers(others, count=count, seed=config.tuning.seed)


def _original_model(
    config: SpeakerBenchConfig, model: torch.nn.Module, task: ASRTask, corpus: SpeakerCorpus, *, device: torch.device
) -> torch.nn.Module:
    """The model before unlearning: as loaded, or fine-tuned on the training speakers (stored by content)."""
    settings = config.original
    if settings.steps == 0:
        return model.to(device).eval()
    heldout = {u.id for s in speakers_of(corpus.train) for u in _split(config, corpus, s).speaker_heldout}
    train = [u for u in corpus.train if u.id not in heldout]
    fingerprint = content_hash({"source": config.model.source, "window_s": config.model.window_s,
                                "original": settings.model_dump(mode="json"), "train": [u.id for u in train]})

    def fine_tune(fresh: torch.nn.Module) -> None:
        torch.manual_seed(settings.seed)  # dropout, as the original fine-tunes were made
        train_model(fresh, _dataset(train, config), task=task, steps=settings.steps, lr=settings.lr,
                    batch_size=settings.batch_size, optimizer="adam", seed=settings.seed, device=device,
                    log_every=20)

    stored = ModelStore(config.run_dir()).get(
        f"original-{fingerprint}",
        build=lambda: model,
        train=fine_tune,
        meta={"source": config.model.source, "original": settings.model_dump(), "train_utterances": len(train)},
    )
    return stored.model.to(device).eval()


def _split(config: SpeakerBenchConfig, corpus: SpeakerCorpus, speaker: str,
           train: Sequence[Utterance] | None = None) -> SpeakerSplit:
    """The speaker's split; ``train`` (default: every training utterance) is what its retain set is drawn from."""
    protocol = config.scenario
    return speaker_unlearning_split(
        corpus.train if train is None else train,
        corpus.test,
        speaker=speaker,
        seed=protocol.split_seed,
        heldout_fraction=protocol.heldout_fraction,
        retain_fraction=protocol.retain_fraction,
    )


def split_for(config: SpeakerBenchConfig, corpus: SpeakerCorpus, speaker: str, *, phase: str, tested: Sequence[str],
              validating: Sequence[str]) -> SpeakerSplit:
    """A run's split, kept apart from the other phase's: a test run retains no utterance of a validation speaker; a
    validation run retains no utterance of a test speaker or of any test run's retain set. Checked, not assumed."""
    if phase == PHASE:
        return _split(config, corpus, speaker, [u for u in corpus.train if u.speaker not in set(validating)])
    test_splits = [split_for(config, corpus, s, phase=PHASE, tested=tested, validating=validating) for s in tested]
    used = {u.id for split in test_splits for u in [*split.unlearn, *split.speaker_heldout, *split.retain]}
    split = _split(config, corpus, speaker, [u for u in corpus.train if u.id not in used or u.speaker == speaker])
    shared = used & {u.id for u in [*split.unlearn, *split.speaker_heldout, *split.retain]}
    if shared:
        raise ValueError(f"validation speaker {speaker} shares {len(shared)} utterances with the test runs: choose "
                         "speakers.names / tuning.splits so that no validation speaker is tested")
    return split


def _dataset(utterances: Sequence[Utterance], config: SpeakerBenchConfig) -> SpeechDataset:
    return SpeechDataset([(u.path, u.text) for u in utterances], window_s=config.model.window_s)


def _loader(dataset: SpeechDataset, task: ASRTask) -> DataLoader:
    return DataLoader(dataset, batch_size=64, shuffle=False, collate_fn=task.collate_fn())


# ------------------------------------------------------------------------------------------------ the experiment


class SpeakerExperiment:
    """``bench.engine.Experiment`` for a speaker-unlearning config: one phase of speaker x variant jobs.

    ``unlearn`` (default: ``bench_unlearn``) makes each run; ``data_parallel`` swaps in the data-parallel one."""

    def __init__(self, config: SpeakerBenchConfig, *, unlearn: UnlearnRun = bench_unlearn) -> None:
        self.config = config
        self.unlearn = unlearn
        self.selection: dict[str, Any] | None = None  # the validation phase's choices, once planned

    def setup(self) -> None:
        _context(self.config)

    def plan(self, finished: FinishedRuns) -> Iterator[Phase]:
        """The validation runs of the gridded runs (when any), then the test runs with each one's chosen variant."""
        ctx = _context(self.config)
        chosen: dict[str, dict[str, Any]] = {}
        if self.config.tuned_rows():
            rows = searches(self.config)
            jobs = plan_validation_jobs(self.config, ctx.validation_speakers,
                                        {label: search.rounds[0] for label, search in rows.items()})
            yield Phase(VALIDATION, jobs)
            chosen = choose_variants(self.config, [finished[job.key] for job in jobs],
                                     {label: search.tried() for label, search in rows.items()})
            extended = plan_validation_jobs(self.config, ctx.validation_speakers, {
                label: search.extension(chosen[label]["point"]) for label, search in rows.items()})
            if extended:
                yield Phase(f"{VALIDATION}, edges extended", extended)
                jobs = [*jobs, *extended]
                chosen = choose_variants(self.config, [finished[job.key] for job in jobs],
                                         {label: search.tried() for label, search in rows.items()})
            for label, search in rows.items():
                chosen[label].update(search.summary(chosen[label]["point"]))
            self.selection = {"rule": "lowest mean W_val among the variants that reach the target on every validation "
                                      "speaker (else the highest mean W_unlearn: a fallback)",
                              "validation_speakers": ctx.validation_speakers, "runs": chosen}
        yield Phase(PHASE, plan_jobs(self.config, ctx.speakers,
                                     {label: (c["variant"], c["params"]) for label, c in chosen.items()}))

    def run_job(self, job: Job) -> Record:
        """Measure the original model (the Original row) or unlearn the speaker with the job's method."""
        config, ctx = self.config, _context(self.config)
        speaker = job.split["speaker"]
        split = split_for(config, ctx.corpus, speaker, phase=job.phase, tested=ctx.speakers,
                          validating=ctx.validation_speakers)
        sets = {name: _dataset(getattr(split, name), config)
                for name in ("unlearn", "speaker_heldout", "retain", "test")}
        if ctx.corpus.validation:
            sets["validation"] = _dataset(ctx.corpus.validation, config)

        def wer(model: torch.nn.Module, name: str) -> float:
            return ctx.task.evaluate(model, _loader(sets[name], ctx.task), device=ctx.device)

        envelope: dict[str, Any] = {"task": TASK, "bench": config.name, "key": job.digest, "phase": job.phase,
                    "method": job.method,
                    "label": job.label, "hyperparameters": job.hyperparameters}
        if job.method == "original":
            metrics = {name: wer(ctx.original, name) for name in sets}
            return self._record(job, record_envelope(**envelope, seed=None), metrics)
        log.info("speaker %s: %s", speaker, job.split["variant"])
        protocol = config.protocol
        result = self.unlearn(
            ctx.original,
            sets["unlearn"],
            sets["retain"],
            method=job.method,
            task=ctx.task,
            stop=wer_target_rule(threshold=protocol.stop) if protocol.stop is not None else "never",
            test=sets["test"],
            **run_schedule(protocol, method=job.method, hyperparameters=job.hyperparameters,
                           forget_size=len(sets["unlearn"]), has_rule=protocol.stop is not None),
            track=protocol.track,
            device=ctx.device,
            seed=run_seed(config),
            verbose=False,
            **job.hyperparameters,
        )
        metrics = {
            "unlearn": result.final["forget"],
            "retain": result.final["retain"],
            "test": result.final["test"],
            **{name: wer(result.model, name) for name in ("speaker_heldout", "validation") if name in sets},
        }
        return self._record(job, record_envelope(**envelope, seed=run_seed(config), result=result), metrics)

    @staticmethod
    def _record(job: Job, envelope: Record, metrics: Mapping[str, float]) -> Record:
        return {
            **envelope,
            "speaker": job.split["speaker"],
            "variant": job.split["variant"],
            "tables": list(job.extra["tables"]),
            "W_retain": metrics["retain"],
            "W_unlearn": metrics["unlearn"],
            "W_speaker": metrics["speaker_heldout"],
            "W_test": metrics["test"],
            "W_val": metrics.get("validation"),  # the validation speakers (None without them)
        }

    def data_parallel(self, device: torch.device) -> SpeakerExperiment:
        """Every job on torchrun's ranks, this rank's models on ``device``: each run as ``unlearn_distributed``, the
        WERs before and after it measured whole on every rank (``bench.data_parallel``)."""
        from orthograd.bench.data_parallel import on_rank_device, unlearn_on_ranks  # torch.distributed: ddp only

        return SpeakerExperiment(on_rank_device(self.config, device), unlearn=unlearn_on_ranks)

    def record_key(self, record: Mapping[str, Any]) -> str:
        return record_key(record, IDENTITY)

    def describe(self, record: Mapping[str, Any]) -> str:
        return (f"{record['speaker']}: {record['variant']}  W_retain {record['W_retain']:.1f}  "
                f"W_unlearn {record['W_unlearn']:.1f}  W_speaker {record['W_speaker']:.1f}  "
                f"W_test {record['W_test']:.1f}")

    def write_tables(self, records: Sequence[Mapping[str, Any]], out_dir: Path) -> Path:
        """``tables.md`` (``speaker_tables``) and, with gridded runs, ``selection.json`` (every variant's figures)."""
        if self.selection is not None:
            atomic_write_json(out_dir / "selection.json", self.selection)
        path = out_dir / "tables.md"
        atomic_write_text(path, speaker_tables(records, self.config))
        return path

