"""The offline speaker benchmark: espeak voices are distinct, a tiny end-to-end unlearning run works, and the
committed records' keys are planned again."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orthograd.asr_bench.config import load_config
from orthograd.asr_bench.corpus import SpeakerCorpus, build_corpus
from orthograd.asr_bench.experiment import (
    IDENTITY,
    choose_variants,
    plan_jobs,
    plan_validation_jobs,
    split_for,
    validation_speakers,
)
from orthograd.asr_bench.tables import COLUMNS, speaker_tables
from orthograd.bench.experiments import run_experiment
from orthograd.bench.jobs import record_key
from orthograd.bench.upgrade import upgrade_log
from orthograd.data.espeak import PROBE_SENTENCE, VOICES, make_sentences, speak, synthesize_corpus
from orthograd.data.librispeech import Utterance, pick_speakers

ROOT = Path(__file__).resolve().parents[1]


def test_every_espeak_voice_sounds_different(tmp_path):
    digests = set()
    for voice in VOICES:
        speak(voice, PROBE_SENTENCE, tmp_path / f"{voice.name}.wav")
        digests.add(hashlib.sha256((tmp_path / f"{voice.name}.wav").read_bytes()).hexdigest())
    assert len(VOICES) >= 12 and len(digests) == len(VOICES)
    sentences = make_sentences(600)
    assert len(set(sentences)) == 600


def test_corpus_is_cached_and_each_voice_reads_its_own_sentences(tmp_path):
    first = synthesize_corpus(VOICES[:2], sentences_per_voice=2, cache_dir=tmp_path)
    stamp = first[0].path.stat().st_mtime_ns
    again = synthesize_corpus(VOICES[:2], sentences_per_voice=2, cache_dir=tmp_path)
    assert again == first and again[0].path.stat().st_mtime_ns == stamp
    assert len({u.text for u in first}) == 4 and {u.speaker for u in first} == {VOICES[0].name, VOICES[1].name}
    hashes = json.loads((first[0].path.parent / "voice_hashes.json").read_text())
    assert len(set(hashes.values())) == 2


def test_tiny_speaker_unlearning_run_writes_records_and_tables(tmp_path):
    overrides = [
        f"output={tmp_path / 'run'}",
        f"corpus.cache_dir={tmp_path / 'espeak'}",
        "corpus.train_voices=2", "corpus.test_voices=1", "corpus.sentences_per_voice=4",
        "corpus.test_sentences_per_voice=2",
        "model.window_s=6.0", "model.max_new_tokens=20",
        "original.steps=1", "original.batch_size=2",
        "protocol.defaults={forget_batch_size: 2, retain_batch_size: 2, optimizer: adam}",
        "methods={OrthoGrad: {tables: [1, 2], params: {alpha: 0.2, lr: 1.0e-3}}}",
    ]
    records = run_experiment("configs/espeak_speaker_smoke.yaml", overrides=overrides)
    assert [r["label"] for r in records] == ["Original", "OrthoGrad"]
    for record in records:
        assert all(0.0 <= record[c] <= 100.0 for c in COLUMNS)
    run = records[1]
    assert run["stop_reason"] in ("target_reached", "max_epochs") and run["steps"] >= 1
    assert run["history"][0]["forget"] == records[0]["W_unlearn"]  # every run starts from the same original model
    assert [(r["task"], r["bench"], r["phase"], r["method"]) for r in records] == [
        ("asr", "espeak_speaker_smoke", "test", "original"), ("asr", "espeak_speaker_smoke", "test", "orthograd")]
    assert run["hyperparameters"] == {"forget_batch_size": 2, "retain_batch_size": 2, "optimizer": "adam",
                                      "alpha": 0.2, "lr": 1.0e-3}
    assert records[0]["steps"] is None and run["seed"] == 0 and run["wall_time_s"] > 0
    assert len(list((tmp_path / "run").glob("original-*.safetensors"))) == 1  # the fine-tuned original, stored
    tables = (tmp_path / "run" / "tables.md").read_text()
    assert "Table 1" in tables and "Table 2" in tables and "| Original |" in tables
    # Resuming does no work twice: the same records come back and nothing is appended.
    log = tmp_path / "run" / "results.jsonl"
    lines = log.read_text().count("\n")
    assert len(run_experiment("configs/espeak_speaker_smoke.yaml", overrides=overrides)) == 2
    assert log.read_text().count("\n") == lines
    # A log written before the shared record schema (params, no envelope) resumes too, into the same tables, once
    # `orthograd upgrade-log` has rewritten it
    envelope = ("format", "task", "bench", "phase", "seed", "versions")
    old = [{("params" if k == "hyperparameters" else k): v for k, v in r.items() if k not in envelope}
           for r in map(json.loads, log.read_text().splitlines())]
    log.write_text("".join(json.dumps(r) + "\n" for r in old))
    with pytest.raises(ValueError, match="orthograd upgrade-log"):
        run_experiment("configs/espeak_speaker_smoke.yaml", overrides=overrides)
    assert upgrade_log(log).rewritten == len(old)
    assert [r["key"] for r in run_experiment("configs/espeak_speaker_smoke.yaml", overrides=overrides)] == [
        r["key"] for r in records]
    assert log.read_text().count("\n") == lines and (tmp_path / "run" / "tables.md").read_text() == tables
    # A changed setting makes new records; the old ones stay in the log but out of this config's tables
    changed = run_experiment("configs/espeak_speaker_smoke.yaml",
                             overrides=[*overrides, "protocol.max_epochs=2"])
    assert len(changed) == 2 and {r["key"] for r in changed}.isdisjoint(r["key"] for r in records)


def _record(label: str, variant: str, speaker: str, *, unlearn: float, test: float, val: float,
            phase: str = "test") -> dict:
    return {"label": label, "variant": variant, "speaker": speaker, "W_retain": 1.0, "W_unlearn": unlearn,
            "W_speaker": unlearn, "W_test": test, "W_val": val, "phase": phase, "method": "orthograd-fixed"}


def test_grid_variant_is_chosen_on_validation_speakers_never_on_test():
    config = load_config("configs/espeak_speaker_smoke.yaml", [
        "corpus.validation_voices=1", "tuning.splits=1",
        "methods={OrthoGrad: {method: orthograd-fixed, tables: [1, 2], grid: {lr: [0.001, 0.003]}}}",
    ])
    a, b = "OrthoGrad (lr=0.001)", "OrthoGrad (lr=0.003)"
    assert [v for v, _ in config.rows()[0].expand(size=config.grid_size())] == [a, b]
    # since the shared protocol, the variants unlearn validation speakers in runs of their own: both reach the
    # target there, b has the lower W_val, so b is chosen; the test speakers then run b alone
    validation = [
        *(_record("OrthoGrad", a, s, unlearn=90, test=5, val=30, phase="validation") for s in ("v1", "v2")),
        *(_record("OrthoGrad", b, s, unlearn=90, test=20, val=10, phase="validation") for s in ("v1", "v2")),
    ]
    chosen = choose_variants(config, validation)["OrthoGrad"]
    assert chosen["variant"] == b and not chosen["fallback"] and chosen["W_val"] == 10
    jobs = plan_jobs(config, ["s1"], {"OrthoGrad": (chosen["variant"], chosen["params"])})
    assert [j.split["variant"] for j in jobs] == ["Original", b] and jobs[1].hyperparameters["lr"] == 0.003
    tested = [_record("OrthoGrad", b, s, unlearn=90, test=20, val=10) for s in ("s1", "s2")]
    tables = speaker_tables([*validation, *tested], config)
    assert f"| {b} | " in tables and f"| {a} | " not in tables
    assert f"| OrthoGrad | {b} | 10.00±0.00 | 2 |" in tables  # the selection table names the choice and its W_val
    # a variant that misses the target on one validation speaker is not eligible, however good its validation WER
    validation[3] = _record("OrthoGrad", b, "v2", unlearn=50, test=20, val=10, phase="validation")
    assert choose_variants(config, validation)["OrthoGrad"]["variant"] == a
    # none reaching it: the highest mean W_unlearn, marked as a fallback in the selection table
    validation[0] = _record("OrthoGrad", a, "v1", unlearn=40, test=5, val=30, phase="validation")
    fallback = choose_variants(config, validation)["OrthoGrad"]
    assert fallback["fallback"] and fallback["variant"] == b
    assert f"| OrthoGrad | {b} † |" in speaker_tables([*validation, *tested], config)


def test_validation_runs_retain_nothing_of_a_test_run():
    config = load_config(ROOT / "configs/espeak_speaker.yaml")
    train = [Utterance(Path(f"{v.name}-{i}"), "", v.name, "espeak", f"{v.name}-{i}")
             for v in VOICES[: config.corpus.train_voices] for i in range(20)]
    corpus = SpeakerCorpus(train=train, test=train[:1], validation=[])
    tested = pick_speakers(train, count=config.speakers.count, seed=config.speakers.seed)
    validating = validation_speakers(config, train, tested)
    assert len(validating) == 2 and not set(validating) & set(tested)
    used = set()
    for speaker in tested:
        split = split_for(config, corpus, speaker, phase="test", tested=tested, validating=validating)
        used |= {u.id for u in [*split.unlearn, *split.speaker_heldout, *split.retain]}
        assert not {u.speaker for u in split.retain} & set(validating)
    for speaker in validating:
        split = split_for(config, corpus, speaker, phase="validation", tested=tested, validating=validating)
        assert split.retain and not used & {u.id for u in [*split.unlearn, *split.speaker_heldout, *split.retain]}
    with pytest.raises(ValueError, match="shares .* utterances with the test runs"):
        split_for(config, corpus, tested[0], phase="validation", tested=tested, validating=validating)


def test_a_grid_without_validation_speakers_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"set corpus.validation_voices"):
        load_config("configs/espeak_speaker_smoke.yaml", [
            "methods={OrthoGrad: {method: orthograd-fixed, grid: {lr: [0.001, 0.003]}}}",
        ])


def test_espeak_corpus_keeps_test_voices_and_adds_distinct_validation_voices(tmp_path):
    base = ["corpus.train_voices=2", "corpus.test_voices=1", "corpus.sentences_per_voice=2",
            "corpus.test_sentences_per_voice=1", f"corpus.cache_dir={tmp_path}"]
    without = build_corpus(load_config("configs/espeak_speaker_smoke.yaml", base).corpus, window_s=6.0)
    with_val = build_corpus(
        load_config("configs/espeak_speaker_smoke.yaml", [*base, "corpus.validation_voices=2"]).corpus, window_s=6.0
    )
    def ids(utterances):
        return [(u.id, u.text) for u in utterances]

    assert without.validation == [] and ids(with_val.test) == ids(without.test)
    assert ids(with_val.train) == ids(without.train)
    speakers = {u.speaker for u in with_val.validation}
    assert len(speakers) == 2 and len(with_val.validation) == 2
    assert not speakers & ({u.speaker for u in with_val.test} | {u.speaker for u in with_val.train})


def test_committed_speaker_records_of_the_earlier_protocol_are_not_mixed_into_a_rerun():
    """benchmarks/espeak_speaker/results.jsonl chose its grid variants on the test speakers' runs and checked most
    methods once an epoch; under the shared protocol (validation speakers in runs of their own, one cadence for
    every method) none of its keys is planned again, so a rerun makes new records instead of mixing protocols."""
    config = load_config(ROOT / "configs/espeak_speaker.yaml")
    voices = [Utterance(Path(v.name), "", v.name, "espeak", v.name) for v in VOICES[: config.corpus.train_voices]]
    speakers = pick_speakers(voices, count=config.speakers.count, seed=config.speakers.seed)
    validating = validation_speakers(config, voices, speakers)
    validation_jobs = plan_validation_jobs(config, validating)
    gridded = config.gridded()
    assert len(validation_jobs) == len(validating) * len(gridded) * config.grid_size() == 2 * 4 * 4
    chosen = {spec.label: spec.expand(size=config.grid_size())[0] for spec in gridded}
    jobs = {job.key: job for job in [*validation_jobs, *plan_jobs(config, speakers, chosen)]}
    assert len(jobs) == 32 + len(speakers) * (1 + len(config.methods))
    committed = [json.loads(line) for line in (ROOT / "benchmarks/espeak_speaker/results.jsonl").open()]
    assert committed and not any(record_key(r, IDENTITY) in jobs for r in committed)


def test_config_keeps_numbers_as_written_and_names_the_valid_keys():
    config = load_config("configs/espeak_speaker.yaml", ["model.window_s=8"])
    assert config.protocol.stop == 75 and isinstance(config.protocol.stop, int)  # keys hash it as 75
    assert repr(config.model) == "ModelConfig(source='tiny.en-offline', window_s=8, max_new_tokens=30, device=None)"
    assert config.run_dir() == Path("runs/espeak_speaker")
    with pytest.raises(ValueError, match=r"unknown key 'scenario.nonsense'; valid keys here: heldout_fraction"):
        load_config("configs/espeak_speaker.yaml", ["scenario.nonsense=1"])
    with pytest.raises(ValueError, match=r"model.window_s must be in \(0, 30\]"):
        load_config("configs/espeak_speaker.yaml", ["model.window_s=31"])


def test_config_module_imports_without_the_speech_stack():
    code = "import sys, orthograd.asr_bench.config; assert 'transformers' not in sys.modules, 'transformers loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
