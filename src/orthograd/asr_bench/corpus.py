"""The benchmark's utterances: training speakers and test speakers, from espeak-ng or a local LibriSpeech."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orthograd.asr_bench.config import CorpusConfig
from orthograd.data.espeak import VOICES, synthesize_corpus
from orthograd.data.librispeech import Utterance, scan_librispeech, shorter_than


@dataclass(frozen=True)
class SpeakerCorpus:
    """Training utterances (speakers that may be unlearned) and test utterances (other, unseen speakers)."""

    train: list[Utterance]
    test: list[Utterance]


def build_corpus(config: CorpusConfig, *, window_s: float) -> SpeakerCorpus:
    """The corpus a config names, restricted to utterances that fit the model's input window."""
    if config.kind == "espeak":
        corpus = _espeak(config)
    else:
        corpus = SpeakerCorpus(
            train=shorter_than(scan_librispeech(config.train_dir), window_s),  # type: ignore[arg-type]
            test=shorter_than(scan_librispeech(config.test_dir), window_s),  # type: ignore[arg-type]
        )
    test = corpus.test
    if config.test_max is not None and config.test_max < len(test):
        chosen = np.random.default_rng(config.seed).choice(len(test), size=config.test_max, replace=False)
        test = [test[i] for i in sorted(chosen)]
    return SpeakerCorpus(train=corpus.train, test=test)


def _espeak(config: CorpusConfig) -> SpeakerCorpus:
    needed = config.train_voices + config.test_voices
    if needed > len(VOICES):
        raise ValueError(f"corpus asks for {needed} voices; {len(VOICES)} are defined in orthograd.data.espeak")
    spoken = synthesize_corpus(
        VOICES[:needed], sentences_per_voice=config.sentences_per_voice, seed=config.seed, cache_dir=config.cache_dir
    )
    train_names = {v.name for v in VOICES[: config.train_voices]}
    train, test = [], []
    per_voice: dict[str, int] = {}
    for item in spoken:
        utterance = Utterance(item.path, item.text, item.speaker, "espeak", item.path.stem)
        if item.speaker in train_names:
            train.append(utterance)
        elif per_voice.get(item.speaker, 0) < config.test_sentences_per_voice:
            per_voice[item.speaker] = per_voice.get(item.speaker, 0) + 1
            test.append(utterance)
    return SpeakerCorpus(train=train, test=test)
