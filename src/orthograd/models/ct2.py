"""Read CTranslate2 ``model.bin`` files and map a Whisper spec onto ``transformers``' Whisper parameter names.

No CTranslate2 runtime is needed. The file is little-endian: u32 format version, string spec name, u32 spec
revision, u32 variable count, then per variable: string name, u8 rank, rank x u32 shape, u8 dtype, u32 byte count
and the raw bytes; then u32 alias count and (alias, target) string pairs. A string is a u16 length (counting a
trailing NUL) followed by its bytes. Scalars (rank 0) carry flags such as ``num_heads``.

The Whisper mapping: self-attention ``linear_0`` is q, k, v fused along dim 0 (k has no bias in ``transformers``),
cross-attention ``linear_1`` is k, v fused (bias only for v), ``gamma``/``beta`` are LayerNorm ``weight``/``bias``,
``ffn/linear_0|1`` are ``fc1``/``fc2`` and the output projection is tied to the decoder token embedding.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
}
_BF16 = 5


@dataclass(frozen=True)
class CT2Model:
    """The contents of a ``model.bin``: spec name and revision, variables by name, and aliases."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def get(self, name: str) -> np.ndarray:
        """A variable by name, following aliases."""
        return self.variables[self.aliases.get(name, name)]


def read_ct2(path: str | Path) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` (or the folder holding it) into numpy arrays."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    with path.open("rb") as stream:
        version = _unpack(stream, "I")
        if version < 5:
            raise ValueError(f"{path}: CTranslate2 format version {version} is not supported (need >= 5)")
        spec = _read_string(stream)
        revision = _unpack(stream, "I")
        variables = {}
        for _ in range(_unpack(stream, "I")):
            name = _read_string(stream)
            rank = _unpack(stream, "B")
            shape = tuple(_unpack(stream, "I") for _ in range(rank))
            dtype_code = _unpack(stream, "B")
            raw = stream.read(_unpack(stream, "I"))
            variables[name] = _decode_array(raw, dtype_code, shape, name)
        aliases = {}
        for _ in range(_unpack(stream, "I")):
            alias = _read_string(stream)
            aliases[alias] = _read_string(stream)
    return CT2Model(spec=spec, revision=revision, variables=variables, aliases=aliases)


def _unpack(stream: BinaryIO, fmt: str) -> int:
    size = struct.calcsize("<" + fmt)
    data = stream.read(size)
    if len(data) != size:
        raise ValueError("truncated CTranslate2 file")
    return struct.unpack("<" + fmt, data)[0]


def _read_string(stream: BinaryIO) -> str:
    length = _unpack(stream, "H")
    return stream.read(length).rstrip(b"\0").decode("utf-8")


def _decode_array(raw: bytes, dtype_code: int, shape: tuple[int, ...], name: str) -> np.ndarray:
    if dtype_code == _BF16:  # numpy has no bfloat16: widen the 16 stored bits into the top of a float32
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype_code not in CT2_DTYPES:
        raise ValueError(f"variable {name!r} has unknown CTranslate2 dtype code {dtype_code}")
    return np.frombuffer(raw, dtype=CT2_DTYPES[dtype_code]).reshape(shape).copy()


def whisper_config_kwargs(model: CT2Model) -> dict[str, int]:
    """``WhisperConfig`` sizes read off the variable shapes (d_model, layers, heads, vocabulary, positions)."""
    if model.spec != "WhisperSpec":
        raise ValueError(f"expected a CTranslate2 WhisperSpec model, got {model.spec!r}")
    names = model.variables
    embed = model.get("decoder/embeddings/weight")
    return {
        "vocab_size": embed.shape[0],
        "d_model": embed.shape[1],
        "num_mel_bins": model.get("encoder/conv1/weight").shape[1],
        "encoder_layers": _count_layers(names, "encoder"),
        "decoder_layers": _count_layers(names, "decoder"),
        "encoder_attention_heads": int(model.get("encoder/num_heads")),
        "decoder_attention_heads": int(model.get("decoder/num_heads")),
        "encoder_ffn_dim": model.get("encoder/layer_0/ffn/linear_0/weight").shape[0],
        "decoder_ffn_dim": model.get("decoder/layer_0/ffn/linear_0/weight").shape[0],
        "max_source_positions": model.get("encoder/position_encodings/encodings").shape[0],
        "max_target_positions": model.get("decoder/position_encodings/encodings").shape[0],
    }


def _count_layers(names: dict[str, np.ndarray], stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    if not indices or indices != set(range(len(indices))):
        raise ValueError(f"CTranslate2 model has no contiguous {stack} layers")
    return len(indices)


def whisper_state_dict(model: CT2Model) -> dict[str, torch.Tensor]:
    """The ``WhisperForConditionalGeneration`` state dict (float32) equivalent to a CTranslate2 Whisper model."""
    sizes = whisper_config_kwargs(model)
    m = _Mapper(model)
    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        m.linear(f"{enc}.{conv}", f"encoder/{conv}")
    m.put(f"{enc}.embed_positions.weight", "encoder/position_encodings/encodings")
    m.norm(f"{enc}.layer_norm", "encoder/layer_norm")
    for i in range(sizes["encoder_layers"]):
        hf, ct2 = f"{enc}.layers.{i}", f"encoder/layer_{i}"
        m.self_attention(hf, ct2)
        m.ffn(hf, ct2)
    m.put(f"{dec}.embed_tokens.weight", "decoder/embeddings/weight")
    m.put(f"{dec}.embed_positions.weight", "decoder/position_encodings/encodings")
    m.norm(f"{dec}.layer_norm", "decoder/layer_norm")
    for i in range(sizes["decoder_layers"]):
        hf, ct2 = f"{dec}.layers.{i}", f"decoder/layer_{i}"
        m.self_attention(hf, ct2)
        m.norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        m.linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
        m.fused(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"))
        m.linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        m.ffn(hf, ct2)
    return m.out


class _Mapper:
    """Copies CTranslate2 variables into a state dict under ``transformers``' names (float32)."""

    def __init__(self, model: CT2Model) -> None:
        self.model = model
        self.out: dict[str, torch.Tensor] = {}

    def _set(self, hf_name: str, array: np.ndarray) -> None:
        self.out[hf_name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def put(self, hf_name: str, ct2_name: str) -> None:
        self._set(hf_name, self.model.get(ct2_name))

    def norm(self, hf: str, ct2: str) -> None:
        self.put(f"{hf}.weight", f"{ct2}/gamma")
        self.put(f"{hf}.bias", f"{ct2}/beta")

    def linear(self, hf: str, ct2: str) -> None:
        self.put(f"{hf}.weight", f"{ct2}/weight")
        self.put(f"{hf}.bias", f"{ct2}/bias")

    def fused(self, hf: str, ct2: str, parts: tuple[str, ...]) -> None:
        weights = np.split(self.model.get(f"{ct2}/weight"), len(parts), axis=0)
        biases = np.split(self.model.get(f"{ct2}/bias"), len(parts), axis=0)
        for part, weight, bias in zip(parts, weights, biases, strict=True):
            self._set(f"{hf}.{part}.weight", weight)
            if part != "k_proj":  # transformers' Whisper k projections have no bias
                self._set(f"{hf}.{part}.bias", bias)

    def self_attention(self, hf: str, ct2: str) -> None:
        self.norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        self.fused(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        self.linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")

    def ffn(self, hf: str, ct2: str) -> None:
        self.norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
        self.linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        self.linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
