"""Speaker unlearning end to end: corpus -> original Whisper -> every run x speaker -> results.jsonl -> tables.md.

Every run is scored on the forget, retain, held-out and test utterances and, when the corpus has them, on the
validation speakers (``W_val``), which alone choose among a grid's variants.

The original model is made once (fine-tuned on the training speakers, each speaker's held-out 10% excluded so that
W_speaker is measured on recordings the model never saw) and cached next to the results. Every run starts from it
through ``orthograd.unlearn`` with the same LoRA seed, evaluation schedule and stopping rule (W_unlearn >= target).
Records are appended after each run, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from orthograd.api import resolve_device, unlearn
from orthograd.asr_bench.config import SpeakerBenchConfig, load_config
from orthograd.asr_bench.corpus import SpeakerCorpus, build_corpus
from orthograd.asr_bench.tables import speaker_tables
from orthograd.data.audio import SpeechDataset
from orthograd.data.librispeech import SpeakerSplit, Utterance, pick_speakers, speaker_unlearning_split, speakers_of
from orthograd.io import ResultsLog, atomic_write_text
from orthograd.models.whisper import load_whisper, set_input_window
from orthograd.stopping import wer_target_rule
from orthograd.tasks.asr import ASRTask

log = logging.getLogger(__name__)
Record = dict[str, Any]


def run_config_file(path: str | Path, overrides: Sequence[str] = (), **kwargs: Any) -> list[Record]:
    """``run(load_config(path, overrides))``: the entry point for ``orthograd bench`` on configs with ``task: asr``."""
    return run(load_config(path, overrides), **kwargs)


def run(config: SpeakerBenchConfig, *, on_record: Callable[[Record], None] | None = None) -> list[Record]:
    """Run the benchmark; returns every record of this config (resumed ones included) and writes ``tables.md``."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.model.device)
    model, text = load_whisper(config.model.source)
    set_input_window(model, seconds=config.model.window_s)
    task = ASRTask(text=text, max_new_tokens=config.model.max_new_tokens)
    corpus = build_corpus(config.corpus, window_s=config.model.window_s)
    original = _original_model(config, model, task, corpus, device=device, cache_dir=out)
    results = ResultsLog(out / "results.jsonl")
    done = {(r["speaker"], r["variant"], r["key"]) for r in results.records()}
    planned: set[str] = set()  # this config's record keys: older records in the same log stay out of the tables
    speakers = config.speakers.names or pick_speakers(
        corpus.train, count=config.speakers.count, seed=config.speakers.seed
    )
    stop = wer_target_rule(threshold=config.unlearning.stop_wer) if config.unlearning.stop_wer is not None else None
    validation = _dataset(corpus.validation, config) if corpus.validation else None
    for speaker in speakers:
        split = _split(config, corpus, speaker)
        sets = {
            name: _dataset(getattr(split, name), config) for name in ("unlearn", "speaker_heldout", "retain", "test")
        }
        if validation is not None:
            sets["validation"] = validation
        key = _key(config, "Original", {})
        planned.add(key)
        if (speaker, "Original", key) not in done:
            metrics = {name: task.evaluate(original, _loader(data, task), device=device) for name, data in sets.items()}
            _emit(results, on_record, _record(speaker, "Original", "Original", "original", {}, [1, 2], key, metrics))
        for spec in config.runs:
            for variant, params in spec.expand():
                merged = {**config.unlearning.defaults, **params}
                key = _key(config, variant, merged)
                planned.add(key)
                if (speaker, variant, key) in done:
                    continue
                log.info("speaker %s: %s", speaker, variant)
                result = unlearn(
                    original,
                    sets["unlearn"],
                    sets["retain"],
                    method=spec.method,
                    task=task,
                    stop=stop,
                    test=sets["test"],
                    max_epochs=config.unlearning.max_epochs,
                    eval_every=config.unlearning.eval_every,
                    track=config.unlearning.track,
                    device=device,
                    seed=config.unlearning.seed,
                    **merged,
                )
                final = result.final
                metrics = {
                    "unlearn": final["forget"],
                    "retain": final["retain"],
                    "test": final["test"],
                    **{name: task.evaluate(result.model, _loader(sets[name], task), device=device)
                       for name in ("speaker_heldout", "validation") if name in sets},
                }
                record = _record(speaker, spec.label, variant, spec.method, merged, spec.tables, key, metrics)
                record.update(
                    stop_reason=result.stop_reason,
                    steps=result.steps,
                    epochs=result.epochs,
                    wall_time_s=round(result.wall_time_s, 1),
                    history=result.history,
                )
                _emit(results, on_record, record)
    records = [r for r in results.records() if r["speaker"] in speakers and r["key"] in planned]
    atomic_write_text(out / "tables.md", speaker_tables(records, config))
    return records


def _emit(results: ResultsLog, on_record: Callable[[Record], None] | None, record: Record) -> None:
    results.append(record)
    if on_record is not None:
        on_record(record)


def _record(
    speaker: str, label: str, variant: str, method: str, params: Mapping[str, Any], tables: list[int], key: str,
    metrics: Mapping[str, float],
) -> Record:
    return {
        "speaker": speaker,
        "label": label,
        "variant": variant,
        "method": method,
        "params": dict(params),
        "tables": list(tables),
        "key": key,
        "W_retain": metrics["retain"],
        "W_unlearn": metrics["unlearn"],
        "W_speaker": metrics["speaker_heldout"],
        "W_test": metrics["test"],
        "W_val": metrics.get("validation"),  # the validation speakers (None without them)
    }


def _key(config: SpeakerBenchConfig, variant: str, params: Mapping[str, Any]) -> str:
    """What determines a record: the data, model and protocol settings and the run's hyperparameters."""
    payload = [
        repr(config.corpus), repr(config.model), repr(config.original), repr(config.protocol),
        config.unlearning.max_epochs, config.unlearning.stop_wer, config.unlearning.eval_every,
        config.unlearning.seed, variant, sorted(params.items(), key=lambda kv: kv[0]),
    ]
    if config.unlearning.track != "all":  # records made before the option keep their keys
        payload.append(config.unlearning.track)
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:12]


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


def _original_model(
    config: SpeakerBenchConfig, model: torch.nn.Module, task: ASRTask, corpus: SpeakerCorpus, *,
    device: torch.device, cache_dir: Path,
) -> torch.nn.Module:
    """The model before unlearning: as loaded, or fine-tuned on the training speakers (cached by content)."""
    settings = config.original
    if settings.steps == 0:
        return model.to(device).eval()
    heldout = {u.id for s in speakers_of(corpus.train) for u in _split(config, corpus, s).speaker_heldout}
    train = [u for u in corpus.train if u.id not in heldout]
    fingerprint = json.dumps([config.model.source, config.model.window_s, repr(settings), [u.id for u in train]])
    path = cache_dir / f"original-{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.to(device).eval()
    finetune(model, _dataset(train, config), task=task, steps=settings.steps, batch_size=settings.batch_size,
             lr=settings.lr, seed=settings.seed, device=device)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.eval()


def finetune(
    model: torch.nn.Module, dataset: SpeechDataset, *, task: ASRTask, steps: int, batch_size: int, lr: float,
    seed: int, device: torch.device,
) -> torch.nn.Module:
    """Plain supervised fine-tuning of every parameter with Adam for ``steps`` batches (reshuffled each pass)."""
    torch.manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=task.collate_fn())
    step, started = 0, time.perf_counter()
    while step < steps:
        for batch in loader:
            loss = task.mean_loss(model, task.to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 20 == 0 or step == steps:
                log.info(
                    "original model: step %d/%d loss %.3f (%.0f s)",
                    step,
                    steps,
                    float(loss.detach()),
                    time.perf_counter() - started,
                )
            if step == steps:
                break
    return model.eval()


__all__ = ["finetune", "run", "run_config_file"]
