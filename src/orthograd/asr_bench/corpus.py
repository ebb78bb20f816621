"""The benchmark's utterances: training, test and validation speakers, from espeak-ng or a local LibriSpeech."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orthograd.asr_bench.config import CorpusConfig
from orthograd.data.espeak import VOICES, synthesize_corpus
from orthograd.data.librispeech import Utterance, scan_librispeech, shorter_than


@dataclass(frozen=True)
class SpeakerCorpus:
    """Training utterances (speakers that may be unlearned), test and validation utterances (unseen speakers)."""

    train: list[Utterance]
    test: list[Utterance]
    validation: list[Utterance]


def build_corpus(config: CorpusConfig, *, window_s: float) -> SpeakerCorpus:
    """The corpus a config names, restricted to utterances that fit the model's input window."""
    if config.kind == "espeak":
        corpus = _espeak(config)
    else:
        assert config.train_dir is not None and config.test_dir is not None  # CorpusConfig checks
        corpus = SpeakerCorpus(
            train=shorter_than(scan_librispeech(config.train_dir), window_s),
            test=shorter_than(scan_librispeech(config.test_dir), window_s),
            validation=shorter_than(scan_librispeech(config.validation_dir), window_s) if config.validation_dir
            else [],
        )
    return SpeakerCorpus(
        train=corpus.train,
        test=_at_most(corpus.test, config.test_max, seed=config.seed),
        validation=_at_most(corpus.validation, config.test_max, seed=config.seed),
    )


def _at_most(utterances: list[Utterance], count: int | None, *, seed: int) -> list[Utterance]:
    """A random subset of ``count`` utterances, in corpus order (all of them when ``count`` is None)."""
    if count is None or count >= len(utterances):
        return utterances
    chosen = np.random.default_rng(seed).choice(len(utterances), size=count, replace=False)
    return [utterances[i] for i in sorted(chosen)]


def _espeak(config: CorpusConfig) -> SpeakerCorpus:
    """Voices in ``VOICES`` order: training, then test, then validation speakers."""
    first_test, first_validation = config.train_voices, config.train_voices + config.test_voices
    needed = first_validation + config.validation_voices
    if needed > len(VOICES):
        raise ValueError(f"corpus asks for {needed} voices; {len(VOICES)} are defined in orthograd.data.espeak")
    spoken = synthesize_corpus(
        VOICES[:needed], sentences_per_voice=config.sentences_per_voice, seed=config.seed, cache_dir=config.cache_dir
    )
    role = {v.name: ("train" if i < first_test else "test" if i < first_validation else "validation")
            for i, v in enumerate(VOICES[:needed])}
    sets: dict[str, list[Utterance]] = {"train": [], "test": [], "validation": []}
    per_voice: dict[str, int] = {}
    for item in spoken:
        utterance = Utterance(item.path, item.text, item.speaker, "espeak", item.path.stem)
        if role[item.speaker] == "train":
            sets["train"].append(utterance)
        elif per_voice.get(item.speaker, 0) < config.test_sentences_per_voice:
            per_voice[item.speaker] = per_voice.get(item.speaker, 0) + 1
            sets[role[item.speaker]].append(utterance)
    return SpeakerCorpus(**sets)
