"""Speaker unlearning as an engine experiment: corpus -> original Whisper -> every speaker x table row -> records.

Every run is scored on the forget, retain, held-out and test utterances and, when the corpus has them, on the
validation speakers (``W_val``), which alone choose among a grid's variants (in the tables, so every variant runs).

The original model is made once (fine-tuned on the training speakers, each speaker's held-out 10% excluded so that
W_speaker is measured on recordings the model never saw) and stored in the run folder (``bench.model_store``).
Every run starts from it through ``orthograd.unlearn`` with the same LoRA seed, evaluation schedule and stopping
rule (W_unlearn >= target). ``run`` hands the experiment to the engine (``bench.engine``), which logs each record to
``RUN_DIR/results.jsonl`` as it finishes (an interrupted benchmark resumes where it stopped), runs the jobs in
``workers`` processes and writes ``tables.md`` at the end.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from orthograd.api import unlearn
from orthograd.asr_bench.config import SpeakerBenchConfig, load_config
from orthograd.asr_bench.corpus import SpeakerCorpus, build_corpus
from orthograd.asr_bench.tables import speaker_tables
from orthograd.bench.config import content_hash
from orthograd.bench.engine import FinishedRuns, OnRun, Phase
from orthograd.bench.experiments import run_experiment
from orthograd.bench.model_store import ModelStore
from orthograd.bench.records import record_envelope
from orthograd.data.audio import SpeechDataset
from orthograd.data.librispeech import SpeakerSplit, Utterance, pick_speakers, speaker_unlearning_split, speakers_of
from orthograd.io import atomic_write_text
from orthograd.models.whisper import load_whisper, set_input_window
from orthograd.runtime import resolve_device
from orthograd.stopping import wer_target_rule
from orthograd.tasks.asr import ASRTask
from orthograd.training import train_model

log = logging.getLogger(__name__)
Record = dict[str, Any]
TASK = "asr"
PHASE = "test"  # one phase: every variant runs on the test speakers; the tables choose a grid's on W_val
ORIGINAL = "Original"


@dataclass(frozen=True)
class SpeakerJob:
    """One record to make: a speaker and one variant of a table row (the Original row measures the original)."""

    key: str  # the record's identity in the log (``record_key``)
    settings_key: str  # the record's stored ``key``: what determines it besides the speaker (``settings_key``)
    speaker: str
    label: str
    variant: str
    method: str  # "original" for the Original row
    hyperparameters: Mapping[str, Any]
    tables: tuple[int, ...]


def settings_key(config: SpeakerBenchConfig, variant: str, params: Mapping[str, Any]) -> str:
    """What determines a record besides its speaker: the data, model and protocol settings and the run's
    hyperparameters (the sections' ``repr``, as the records were first written with)."""
    payload = [
        repr(config.corpus), repr(config.model), repr(config.original), repr(config.protocol),
        config.unlearning.max_epochs, config.unlearning.stop_wer, config.unlearning.eval_every,
        config.unlearning.seed, variant, sorted(params.items(), key=lambda kv: kv[0]),
    ]
    if config.unlearning.track != "all":  # records made before the option keep their keys
        payload.append(config.unlearning.track)
    return content_hash(payload, length=12, sort_keys=False, compact=False)


def _identity(speaker: str, variant: str, key: str) -> str:
    return json.dumps([speaker, variant, key])


def record_key(record: Mapping[str, Any]) -> str:
    """A record's identity in the results log: its speaker, variant and settings key."""
    return _identity(record["speaker"], record["variant"], record["key"])


def plan_jobs(config: SpeakerBenchConfig, speakers: Sequence[str]) -> list[SpeakerJob]:
    """Per speaker, the Original row and then every run's variants in config order (needs no corpus or model)."""

    def job(speaker: str, label: str, variant: str, method: str, params: Mapping[str, Any],
            tables: Sequence[int]) -> SpeakerJob:
        key = settings_key(config, variant, params)
        return SpeakerJob(_identity(speaker, variant, key), key, speaker, label, variant, method, dict(params),
                          tuple(tables))

    jobs = []
    for speaker in speakers:
        jobs.append(job(speaker, ORIGINAL, ORIGINAL, "original", {}, (1, 2)))
        for spec in config.runs:
            for variant, params in spec.expand():
                jobs.append(job(speaker, spec.label, variant, spec.method,
                                {**config.unlearning.defaults, **params}, spec.tables))
    return jobs


# ------------------------------------------------------------------------------------------- per-process context


@dataclass(frozen=True)
class _Context:
    """What every job of one config reads: the corpus, the original model and the speakers to unlearn."""

    task: ASRTask
    corpus: SpeakerCorpus
    original: torch.nn.Module
    device: torch.device
    speakers: list[str]


_CONTEXT: dict[str, _Context] = {}  # this process's context, by the config's content hash (the latest config only)


def _context(config: SpeakerBenchConfig) -> _Context:
    """The config's context in this process (built on first use: corpus synthesis, original model training)."""
    key = content_hash(config.model_dump(mode="json"))
    if key not in _CONTEXT:
        _CONTEXT.clear()  # one config at a time: a model per config would pile up in a long-lived process
        device = resolve_device(config.model.device)
        model, text = load_whisper(config.model.source)
        set_input_window(model, seconds=config.model.window_s)
        task = ASRTask(text=text, max_new_tokens=config.model.max_new_tokens)
        corpus = build_corpus(config.corpus, window_s=config.model.window_s)
        speakers = config.speakers.names or pick_speakers(
            corpus.train, count=config.speakers.count, seed=config.speakers.seed
        )
        original = _original_model(config, model, task, corpus, device=device)
        _CONTEXT[key] = _Context(task, corpus, original, device, list(speakers))
    return _CONTEXT[key]


def _original_model(
    config: SpeakerBenchConfig, model: torch.nn.Module, task: ASRTask, corpus: SpeakerCorpus, *, device: torch.device
) -> torch.nn.Module:
    """The model before unlearning: as loaded, or fine-tuned on the training speakers (stored by content)."""
    settings = config.original
    if settings.steps == 0:
        return model.to(device).eval()
    heldout = {u.id for s in speakers_of(corpus.train) for u in _split(config, corpus, s).speaker_heldout}
    train = [u for u in corpus.train if u.id not in heldout]
    fingerprint = content_hash([config.model.source, config.model.window_s, repr(settings), [u.id for u in train]],
                               length=12, sort_keys=False, compact=False)

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


def _split(config: SpeakerBenchConfig, corpus: SpeakerCorpus, speaker: str) -> SpeakerSplit:
    protocol = config.protocol
    return speaker_unlearning_split(
        corpus.train,
        corpus.test,
        speaker=speaker,
        seed=protocol.split_seed,
        heldout_fraction=protocol.heldout_fraction,
        retain_fraction=protocol.retain_fraction,
    )


def _dataset(utterances: Sequence[Utterance], config: SpeakerBenchConfig) -> SpeechDataset:
    return SpeechDataset([(u.path, u.text) for u in utterances], window_s=config.model.window_s)


def _loader(dataset: SpeechDataset, task: ASRTask) -> DataLoader:
    return DataLoader(dataset, batch_size=64, shuffle=False, collate_fn=task.collate_fn())


# ------------------------------------------------------------------------------------------------ the experiment


class SpeakerExperiment:
    """``bench.engine.Experiment`` for a speaker-unlearning config: one phase of speaker x variant jobs."""

    def __init__(self, config: SpeakerBenchConfig) -> None:
        self.config = config

    def setup(self) -> None:
        _context(self.config)

    def plan(self, finished: FinishedRuns) -> Iterator[Phase]:
        yield Phase(PHASE, plan_jobs(self.config, _context(self.config).speakers))

    def run_job(self, job: SpeakerJob) -> Record:
        """Measure the original model (the Original row) or unlearn the speaker with the job's method."""
        config, ctx = self.config, _context(self.config)
        split = _split(config, ctx.corpus, job.speaker)
        sets = {name: _dataset(getattr(split, name), config)
                for name in ("unlearn", "speaker_heldout", "retain", "test")}
        if ctx.corpus.validation:
            sets["validation"] = _dataset(ctx.corpus.validation, config)

        def wer(model: torch.nn.Module, name: str) -> float:
            return ctx.task.evaluate(model, _loader(sets[name], ctx.task), device=ctx.device)

        envelope = {"task": TASK, "bench": config.name, "key": job.settings_key, "phase": PHASE, "method": job.method,
                    "label": job.label, "hyperparameters": job.hyperparameters}
        if job.method == "original":
            metrics = {name: wer(ctx.original, name) for name in sets}
            return self._record(job, record_envelope(**envelope, seed=None), metrics)
        log.info("speaker %s: %s", job.speaker, job.variant)
        stop_wer = config.unlearning.stop_wer
        result = unlearn(
            ctx.original,
            sets["unlearn"],
            sets["retain"],
            method=job.method,
            task=ctx.task,
            stop=wer_target_rule(threshold=stop_wer) if stop_wer is not None else "never",
            test=sets["test"],
            max_epochs=config.unlearning.max_epochs,
            eval_every=config.unlearning.eval_every,
            track=config.unlearning.track,
            device=ctx.device,
            seed=config.unlearning.seed,
            verbose=False,
            **job.hyperparameters,
        )
        metrics = {
            "unlearn": result.final["forget"],
            "retain": result.final["retain"],
            "test": result.final["test"],
            **{name: wer(result.model, name) for name in ("speaker_heldout", "validation") if name in sets},
        }
        return self._record(job, record_envelope(**envelope, seed=config.unlearning.seed, result=result), metrics)

    @staticmethod
    def _record(job: SpeakerJob, envelope: Record, metrics: Mapping[str, float]) -> Record:
        return {
            **envelope,
            "speaker": job.speaker,
            "variant": job.variant,
            "tables": list(job.tables),
            "W_retain": metrics["retain"],
            "W_unlearn": metrics["unlearn"],
            "W_speaker": metrics["speaker_heldout"],
            "W_test": metrics["test"],
            "W_val": metrics.get("validation"),  # the validation speakers (None without them)
        }

    def record_key(self, record: Mapping[str, Any]) -> str:
        return record_key(record)

    def describe(self, record: Mapping[str, Any]) -> str:
        return (f"{record['speaker']}: {record['variant']}  W_retain {record['W_retain']:.1f}  "
                f"W_unlearn {record['W_unlearn']:.1f}  W_speaker {record['W_speaker']:.1f}  "
                f"W_test {record['W_test']:.1f}")

    def write_tables(self, records: Sequence[Mapping[str, Any]], out_dir: Path) -> Path:
        path = out_dir / "tables.md"
        atomic_write_text(path, speaker_tables(records, self.config))
        return path


def run(config: SpeakerBenchConfig, *, on_record: OnRun | None = None) -> list[Record]:
    """Run the benchmark; returns every record of this config (resumed ones included) and writes ``tables.md``."""
    return run_experiment([config], on_run=on_record)


def run_config_file(path: str | Path, overrides: Sequence[str] = (), **kwargs: Any) -> list[Record]:
    """``run(load_config(path, overrides))``: the entry point for ``orthograd bench`` on configs with ``task: asr``."""
    return run(load_config(path, overrides), **kwargs)
