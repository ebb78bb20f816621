"""Word error rate as the paper reports it: Whisper's English text normalisation, jiwer alignment, clipped at 100%.

Normalisation is ``transformers``' ``EnglishTextNormalizer`` (Whisper's: lower case, punctuation and fillers
removed, numbers and British spellings standardised). Its British-to-American spelling table ships with the
``whisper-normalizer`` package (``orthograd[asr]``); without it the spelling step is skipped, with a warning.

Clipping (paper, Section 5.3: "we clip the WER at a maximum of 100%", against hallucinated insertions) is
applied to the set's WER by default: WER = min(100, 100 * errors / reference words). ``clip="utterance"``
instead caps each utterance's errors at its number of reference words before summing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from importlib.resources import files
from typing import Literal

from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

log = logging.getLogger(__name__)
MAX_WER = 100.0
ClipMode = Literal["set", "utterance"]


@lru_cache(maxsize=1)
def english_normalizer() -> EnglishTextNormalizer:
    """Whisper's English text normaliser (from transformers), with the spelling table when it is installed."""
    return EnglishTextNormalizer(_spelling_mapping())


def _spelling_mapping() -> dict[str, str]:
    try:
        table = files("whisper_normalizer").joinpath("normalizers/english.json")
    except ModuleNotFoundError:
        log.warning("whisper-normalizer is not installed: British spellings are not mapped to American in WER")
        return {}
    return json.loads(table.read_text(encoding="utf-8"))


def normalize(text: str) -> str:
    """Whisper's English normalisation of one transcript."""
    return english_normalizer()(text)


def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> list[tuple[int, int]]:
    """Per utterance ``(errors, reference words)`` after normalisation (errors: substitutions+deletions+insertions)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    import jiwer

    counts = []
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        ref_words, hyp_words = normalize(reference).split(), normalize(hypothesis).split()
        if not ref_words:  # nothing to recognise: every hypothesised word is an insertion
            counts.append((len(hyp_words), 0))
            continue
        if not hyp_words:
            counts.append((len(ref_words), len(ref_words)))
            continue
        out = jiwer.process_words(" ".join(ref_words), " ".join(hyp_words))
        counts.append((out.substitutions + out.deletions + out.insertions, len(ref_words)))
    return counts


def wer(references: Sequence[str], hypotheses: Sequence[str], *, clip: ClipMode = "set") -> float:
    """Word error rate in percent, clipped at 100 (per set by default, or per utterance)."""
    return wer_from_counts(word_errors(references, hypotheses), clip=clip)


def wer_from_counts(counts: Sequence[tuple[int, int]], *, clip: ClipMode = "set") -> float:
    """WER in percent from per-utterance ``(errors, reference words)``."""
    if clip not in ("set", "utterance"):
        raise ValueError(f"clip must be 'set' or 'utterance', got {clip!r}")
    words = sum(n for _, n in counts)
    if words == 0:
        raise ValueError("WER is undefined without reference words")
    if clip == "utterance":
        errors = sum(min(e, n) for e, n in counts)
    else:
        errors = sum(e for e, _ in counts)
    return min(MAX_WER, 100.0 * errors / words)
