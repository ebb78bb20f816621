"""LibriSpeech from a local copy, split for speaker unlearning as in the paper (Section 5.3, Appendix A.2).

Layout (as distributed): ``<split>/<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac`` plus one
``<speaker>-<chapter>.trans.txt`` per chapter with lines ``<utterance id> <TRANSCRIPT>``.

Protocol: one training speaker (train-clean-100) is the unlearn set; 10% of that speaker's utterances are held out
(never trained on during unlearning) to measure W_speaker; 10% of the remaining training utterances (the other
speakers) form the retain set; the test set is test-clean as distributed. Results are averaged over 5 speakers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HELDOUT_FRACTION = 0.1
RETAIN_FRACTION = 0.1


@dataclass(frozen=True)
class Utterance:
    """One recording and its transcript."""

    path: Path
    text: str
    speaker: str
    chapter: str
    id: str


def scan_librispeech(root: str | Path) -> list[Utterance]:
    """Every utterance under a LibriSpeech split folder (e.g. ``.../LibriSpeech/train-clean-100``), sorted by id."""
    root = Path(root)
    transcripts = sorted(root.glob("*/*/*.trans.txt"))
    if not transcripts:
        raise FileNotFoundError(
            f"no LibriSpeech transcripts (<speaker>/<chapter>/*.trans.txt) under {root}; "
            "point at a split folder such as LibriSpeech/train-clean-100"
        )
    utterances = []
    for transcript in transcripts:
        chapter_dir = transcript.parent
        for line in transcript.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            audio = chapter_dir / f"{utt_id}.flac"
            if not audio.is_file():
                raise FileNotFoundError(f"{transcript} lists {utt_id} but {audio} is missing")
            utterances.append(Utterance(audio, text, chapter_dir.parent.name, chapter_dir.name, utt_id))
    return sorted(utterances, key=lambda u: u.id)


@dataclass(frozen=True)
class SpeakerSplit:
    """The four sets of one speaker-unlearning run (W_unlearn, W_speaker, W_retain, W_test are measured on them)."""

    speaker: str
    unlearn: list[Utterance]
    speaker_heldout: list[Utterance]
    retain: list[Utterance]
    test: list[Utterance]

    def __post_init__(self) -> None:
        for name in ("unlearn", "speaker_heldout", "retain", "test"):
            if not getattr(self, name):
                raise ValueError(f"the {name} set of speaker {self.speaker} is empty")
        ids = [u.id for u in self.unlearn + self.speaker_heldout + self.retain]
        if len(ids) != len(set(ids)):
            raise ValueError("unlearn, speaker held-out and retain sets overlap")
        if any(u.speaker == self.speaker for u in self.retain):
            raise ValueError("the retain set contains the unlearned speaker")


def speakers_of(utterances: Sequence[Utterance]) -> list[str]:
    return sorted({u.speaker for u in utterances})


def pick_speakers(train: Sequence[Utterance], *, count: int = 5, seed: int = 0) -> list[str]:
    """``count`` distinct training speakers drawn at random (the paper averages over 5)."""
    speakers = speakers_of(train)
    if not 1 <= count < len(speakers):
        raise ValueError(f"count must be between 1 and {len(speakers) - 1} (speakers available), got {count}")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(speakers, size=count, replace=False).tolist())


def _fraction(n: int, fraction: float) -> int:
    return max(1, round(n * fraction))


def speaker_unlearning_split(
    train: Sequence[Utterance],
    test: Sequence[Utterance],
    *,
    speaker: str,
    seed: int = 0,
    heldout_fraction: float = HELDOUT_FRACTION,
    retain_fraction: float = RETAIN_FRACTION,
) -> SpeakerSplit:
    """Unlearn ``speaker``: hold out ``heldout_fraction`` of their utterances, retain ``retain_fraction`` of the
    rest."""
    for name, value in (("heldout_fraction", heldout_fraction), ("retain_fraction", retain_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    own = [u for u in train if u.speaker == speaker]
    others = [u for u in train if u.speaker != speaker]
    if len(own) < 2:
        raise ValueError(
            f"speaker {speaker!r} has {len(own)} training utterances; choose from {speakers_of(train)[:10]}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(own))
    n_heldout = _fraction(len(own), heldout_fraction)
    heldout = sorted((own[i] for i in order[:n_heldout]), key=lambda u: u.id)
    unlearn = sorted((own[i] for i in order[n_heldout:]), key=lambda u: u.id)
    chosen = rng.choice(len(others), size=_fraction(len(others), retain_fraction), replace=False)
    retain = sorted((others[i] for i in chosen), key=lambda u: u.id)
    return SpeakerSplit(speaker=speaker, unlearn=unlearn, speaker_heldout=heldout, retain=retain, test=list(test))


def audio_duration_s(utterance: Utterance) -> float:
    """Length of an utterance's recording in seconds (read from the file header)."""
    import soundfile

    info = soundfile.info(str(utterance.path))
    return info.frames / info.samplerate


def shorter_than(utterances: Sequence[Utterance], seconds: float) -> list[Utterance]:
    """Utterances that fit a ``seconds`` input window (Whisper's is 30 s; longer audio would be cut)."""
    return [u for u in utterances if audio_duration_s(u) <= seconds]
