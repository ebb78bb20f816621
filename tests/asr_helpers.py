"""Shared pieces of the ASR tests: a tiny random Whisper with the real tiny.en tokenizer, and a CT2 writer."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from orthograd.models.whisper import WhisperText, load_offline_text

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


def tiny_whisper(*, seed: int = 0, vocab_size: int = 51864) -> WhisperForConditionalGeneration:
    """A randomly initialised Whisper with tiny.en's vocabulary and special tokens but 2-layer, 16-wide shapes."""
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=vocab_size,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=80,
        max_source_positions=50,
        max_target_positions=64,
        decoder_start_token_id=50257,
        eos_token_id=50256,
        pad_token_id=50256,
        bos_token_id=50256,
    )
    return WhisperForConditionalGeneration(config).eval()


def offline_text() -> WhisperText:
    return load_offline_text()


def librivox_items() -> list[tuple[Path, str]]:
    """(wav, transcript) pairs of the LibriVox recordings in Debian's pocketsphinx-testdata."""
    items = []
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        words, _, file_id = line.rpartition("(")
        text = words.replace("<s>", "").replace("</s>", "").strip()
        items.append((LIBRIVOX / f"{file_id.rstrip(')').strip()}.wav", text))
    return items


def write_ct2(path: Path, variables: dict[str, np.ndarray], *, spec: str = "WhisperSpec",
              aliases: dict[str, str] | None = None) -> None:
    """Write a CTranslate2 model.bin (format version 6) from numpy arrays (float16 -> dtype 4, float32 -> 0,
    int8 -> 1)."""
    codes = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
             np.dtype("float16"): 4}

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", 6), string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, array in variables.items():
        array = np.asarray(array)
        out += [string(name), struct.pack("<B", array.ndim), *(struct.pack("<I", d) for d in array.shape),
                struct.pack("<B", codes[array.dtype]), struct.pack("<I", array.nbytes), array.tobytes()]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [string(alias), string(target)]
    path.write_bytes(b"".join(out))


def whisper_to_ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, np.ndarray]:
    """The inverse of orthograd's mapping, written independently for the round-trip test (float16, fused q/k/v)."""
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    cfg = model.config
    out: dict[str, np.ndarray] = {}

    def norm(ct2: str, hf: str) -> None:
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def linear(ct2: str, hf: str) -> None:
        out[f"{ct2}/weight"], out[f"{ct2}/bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def fused(ct2: str, hf: str, parts: tuple[str, ...]) -> None:
        out[f"{ct2}/weight"] = np.concatenate([sd[f"{hf}.{p}.weight"] for p in parts])
        zeros = np.zeros(cfg.d_model, dtype=np.float16)
        out[f"{ct2}/bias"] = np.concatenate([sd.get(f"{hf}.{p}.bias", zeros) for p in parts])

    for stack in ("encoder", "decoder"):
        hf_stack = f"model.{stack}"
        out[f"{stack}/num_heads"] = np.array(getattr(cfg, f"{stack}_attention_heads"), dtype=np.int16)
        n_layers = getattr(cfg, f"{stack}_layers")
        for i in range(n_layers):
            ct2, hf = f"{stack}/layer_{i}", f"{hf_stack}.layers.{i}"
            norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            fused(f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"))
            linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
            if stack == "decoder":
                norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
                linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
                fused(f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ("k_proj", "v_proj"))
                linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
            norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
            linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
            linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
        norm(f"{stack}/layer_norm", f"{hf_stack}.layer_norm")
        out[f"{stack}/position_encodings/encodings"] = sd[f"{hf_stack}.embed_positions.weight"]
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    return out
