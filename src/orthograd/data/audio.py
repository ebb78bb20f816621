"""Audio for Whisper, as in the paper's A.3: 16 kHz mono, 80-channel log-Mel, 25 ms windows, 10 ms stride.

Audio is read with soundfile and resampled with a polyphase filter (scipy) when its rate is not 16 kHz. Features
come from ``transformers.WhisperFeatureExtractor`` (its defaults are exactly the paper's settings), padded with
silence to the model's input window: 30 s for Whisper as released, shorter after
``orthograd.models.whisper.set_input_window`` (features of a window of ``w`` seconds are ``w * 100`` frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import WhisperFeatureExtractor

from orthograd.models.whisper import FRAMES_PER_SECOND, FULL_WINDOW_S, SAMPLE_RATE


def read_audio(path: str | Path) -> np.ndarray:
    """Mono float32 samples at 16 kHz (channels averaged, resampled when needed)."""
    import soundfile

    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return resample(samples.mean(axis=1), rate=rate)


def resample(samples: np.ndarray, *, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """``samples`` at ``rate`` Hz resampled to ``target`` Hz with scipy's polyphase filter."""
    if rate == target:
        return np.asarray(samples, dtype=np.float32)
    from scipy.signal import resample_poly

    ratio = Fraction(target, rate)
    return resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)


@lru_cache(maxsize=1)
def _extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor()  # 80 mel bins, 16 kHz, n_fft 400 (25 ms), hop 160 (10 ms)


def log_mel(samples: np.ndarray, *, window_s: float = FULL_WINDOW_S) -> torch.Tensor:
    """``[80, window_s * 100]`` log-Mel features of 16 kHz audio, padded with silence to the window.

    Audio longer than the window is an error (Whisper would silently drop its end, and the transcript with it).
    """
    window = round(window_s * SAMPLE_RATE)
    if len(samples) > window:
        raise ValueError(
            f"utterance of {len(samples) / SAMPLE_RATE:.2f} s is longer than the {window_s:g} s input window: "
            "use a longer window (at most 30 s) or drop long utterances"
        )
    features = _extractor()(samples, sampling_rate=SAMPLE_RATE, max_length=window, return_tensors="np")
    frames = round(window_s * FRAMES_PER_SECOND)
    return torch.from_numpy(features["input_features"][0, :, :frames].copy())


class SpeechDataset(Dataset):
    """Utterances ``(audio path, transcript)`` as dicts ``{"input_features": [80, frames], "text": str}``.

    Features are computed when an item is read (a few milliseconds each), so the dataset holds only paths.
    Batch them with the ASR task's ``collate_fn`` (which tokenises the transcripts).
    """

    def __init__(self, items: Sequence[tuple[str | Path, str]], *, window_s: float = FULL_WINDOW_S) -> None:
        self.items = [(Path(path), text) for path, text in items]
        self.window_s = window_s

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, object]:
        path, text = self.items[index]
        return {"input_features": log_mel(read_audio(path), window_s=self.window_s), "text": text}

    def texts(self) -> list[str]:
        return [text for _, text in self.items]
