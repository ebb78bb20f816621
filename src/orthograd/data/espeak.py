"""An offline multi-speaker speech corpus: sentences of our own read by distinct espeak-ng voices.

Real multi-speaker data (LibriSpeech) cannot be downloaded here, so the speaker benchmark that must run anywhere
synthesises one: each voice is an espeak-ng voice + variant with its own pitch (``-p``) and speed (``-s``), and
reads its own sentences (no sentence is read by two voices, as in LibriSpeech where speakers read different
books). Audio is converted to 16 kHz mono with sox. Voices are proven distinct by hashing the audio of one
probe sentence per voice. The corpus is written once under a cache folder keyed by its content and reused.

Pitfall (checked): ``en-gb+f2``-style names silently drop the variant; the voices below avoid that form.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PROBE_SENTENCE = "the quick brown fox jumps over the lazy dog"
CORPUS_VERSION = 1


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: espeak-ng voice (with variant), pitch 0-99 and speed in words per minute."""

    name: str
    voice: str
    pitch: int
    speed: int


VOICES: tuple[Voice, ...] = (
    Voice("us_m1", "en-us+m1", 40, 160),
    Voice("us_f2", "en-us+f2", 60, 150),
    Voice("scot_m3", "en-gb-scotland+m3", 45, 155),
    Voice("rp_f3", "en-gb-x-rp+f3", 70, 165),
    Voice("carib_m4", "en-029+m4", 35, 150),
    Voice("nyc_m2", "en-us-nyc+m2", 50, 170),
    Voice("lanc_f1", "en-gb-x-gbclan+f1", 65, 145),
    Voice("wmid_m5", "en-gb-x-gbcwmd+m5", 30, 160),
    Voice("en_f4", "en+f4", 75, 155),
    Voice("us_klatt", "en-us+klatt", 50, 150),
    Voice("rp_m6", "en-gb-x-rp+m6", 40, 175),
    Voice("scot_f5", "en-gb-scotland+f5", 55, 150),
    Voice("us_m7", "en-us+m7", 45, 160),
    Voice("en_f2", "en+f2", 60, 155),
    Voice("carib_f3", "en-029+f3", 65, 150),
    Voice("nyc_m8", "en-us-nyc+m8", 35, 165),
)

_SUBJECTS = (
    "the old farmer", "my younger sister", "a tired doctor", "the quiet student", "our new neighbour",
    "the small child", "a famous painter", "the ship captain", "her best friend", "the village baker",
    "a careful driver", "the young teacher", "his grandmother", "the hungry traveller", "a local musician",
    "the night guard", "my uncle", "the busy nurse", "a clever engineer", "the team leader",
)
_VERBS = (
    "carried", "painted", "found", "opened", "cleaned", "sold", "borrowed", "repaired", "described", "hid",
    "watched", "counted", "moved", "wrapped", "dropped", "bought", "measured", "followed", "lifted", "checked",
)
_OBJECTS = (
    "a heavy wooden box", "the red bicycle", "seven green apples", "an empty bottle", "the broken window",
    "a long letter", "the silver key", "three warm blankets", "the garden gate", "a bag of rice",
    "the kitchen table", "two paper lanterns", "a yellow umbrella", "the stone bridge", "a basket of eggs",
    "the blue curtains", "a pair of boots", "the tall ladder", "a jar of honey", "the morning paper",
)
_PLACES = (
    "near the river", "behind the station", "in the dark forest", "at the market", "on the hill",
    "inside the museum", "beside the lake", "under the old tree", "across the street", "in the small harbour",
    "outside the school", "by the church", "in the crowded square", "at the farm", "along the beach",
)
_TIMES = (
    "early this morning", "last winter", "before lunch", "after the storm", "on sunday", "late at night",
    "during the holiday", "yesterday evening", "every summer", "at noon",
)
_CLAUSES = (
    "because it was raining", "while the dog was sleeping", "although nobody asked", "and then went home",
    "but forgot to say thanks", "so the others could rest", "before anyone noticed", "and everyone laughed",
)


def make_sentences(count: int, *, seed: int = 0) -> list[str]:
    """``count`` distinct sentences from our own word lists (subject, verb, object, place, then time or clause)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    limit = len(_SUBJECTS) * len(_VERBS) * len(_OBJECTS) * len(_PLACES)
    if count > limit // 10:
        raise ValueError(f"at most {limit // 10} sentences can be drawn, asked for {count}")
    while len(out) < count:
        parts = [_pick(rng, _SUBJECTS), _pick(rng, _VERBS), _pick(rng, _OBJECTS), _pick(rng, _PLACES)]
        tail = rng.integers(3)
        if tail == 1:
            parts.append(_pick(rng, _TIMES))
        elif tail == 2:
            parts.append(_pick(rng, _CLAUSES))
        sentence = " ".join(parts)
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


@dataclass(frozen=True)
class SpokenUtterance:
    """One synthesised recording: file, transcript and the voice that read it."""

    path: Path
    text: str
    speaker: str


def default_cache_dir() -> Path:
    """``$ORTHOGRAD_CACHE/espeak`` or ``~/.cache/orthograd/espeak``."""
    base = os.environ.get("ORTHOGRAD_CACHE") or Path.home() / ".cache" / "orthograd"
    return Path(base) / "espeak"


def synthesize_corpus(
    voices: tuple[Voice, ...] | list[Voice],
    *,
    sentences_per_voice: int,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    jobs: int = 2,
) -> list[SpokenUtterance]:
    """Each voice reads its own ``sentences_per_voice`` sentences; wavs and a manifest are cached and reused."""
    _require_tools()
    voices = list(voices)
    if len({v.name for v in voices}) != len(voices):
        raise ValueError("voice names must be unique")
    sentences = make_sentences(len(voices) * sentences_per_voice, seed=seed)
    plan = [
        (voice, sentences[i * sentences_per_voice + j], f"{voice.name}-{j:04d}")
        for i, voice in enumerate(voices)
        for j in range(sentences_per_voice)
    ]
    key = hashlib.sha256(
        json.dumps([CORPUS_VERSION, [asdict(v) for v in voices], [p[1] for p in plan]]).encode()
    ).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / key
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        _build(folder, voices, plan, jobs=jobs)
    rows = json.loads(manifest.read_text())
    return [SpokenUtterance(folder / r["file"], r["text"], r["speaker"]) for r in rows]


def _require_tools() -> None:
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"{missing} not found: install them (Debian: apt-get install espeak-ng sox; `make install`)")


def _build(folder: Path, voices: list[Voice], plan: list[tuple[Voice, str, str]], *, jobs: int) -> None:
    """Synthesise into a temporary folder, check the voices differ, then move it into place (atomic)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    try:
        probes = [(v, PROBE_SENTENCE, f"probe-{v.name}") for v in voices]
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(lambda item: speak(item[0], item[1], staging / f"{item[2]}.wav"), probes + plan))
        digests = {v.name: hashlib.sha256((staging / f"probe-{v.name}.wav").read_bytes()).hexdigest() for v in voices}
        if len(set(digests.values())) != len(voices):
            raise RuntimeError(f"some espeak voices produce identical audio (variant ignored?): {digests}")
        rows = [{"file": f"{name}.wav", "text": text, "speaker": voice.name} for voice, text, name in plan]
        (staging / "voice_hashes.json").write_text(json.dumps(digests, indent=1))
        (staging / "manifest.json").write_text(json.dumps(rows, indent=1))
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def speak(voice: Voice, text: str, out: Path) -> None:
    """Synthesise ``text`` with ``voice`` into a 16 kHz mono wav."""
    raw = out.with_suffix(".raw.wav")
    subprocess.run(
        ["espeak-ng", "-v", voice.voice, "-p", str(voice.pitch), "-s", str(voice.speed), "-w", str(raw), text],
        check=True,
        capture_output=True,
    )
    subprocess.run(["sox", "-G", str(raw), "-r", "16000", "-c", "1", str(out)], check=True, capture_output=True)
    raw.unlink()
