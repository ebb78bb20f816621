"""Whisper loading: the CTranslate2 reader and mapping (synthetic round trip) and the real offline tiny.en bundle."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from asr_helpers import librivox_items, tiny_whisper, whisper_to_ct2_variables, write_ct2
from torch.utils.data import DataLoader

from orthograd.data.audio import SpeechDataset
from orthograd.models.ct2 import read_ct2, whisper_config_kwargs, whisper_state_dict
from orthograd.models.whisper import (
    input_window_seconds,
    load_ct2_whisper,
    load_whisper,
    offline_tiny_en_path,
    set_input_window,
)
from orthograd.tasks.asr import ASRTask

ALIAS = {"decoder/projection/weight": "decoder/embeddings/weight"}


def test_ct2_file_round_trips_into_an_identical_whisper(tmp_path):
    original = tiny_whisper(seed=1)
    variables = whisper_to_ct2_variables(original)
    write_ct2(tmp_path / "model.bin", variables, aliases=ALIAS)
    ct2 = read_ct2(tmp_path)
    assert ct2.spec == "WhisperSpec" and ct2.aliases == ALIAS
    assert set(ct2.variables) == set(variables)
    for name, array in variables.items():
        assert ct2.variables[name].dtype == array.dtype and np.array_equal(ct2.variables[name], array), name
    sizes = whisper_config_kwargs(ct2)
    for key, value in sizes.items():
        assert getattr(original.config, key) == value, key

    # Converted weights equal the originals rounded to float16 (what the file stores), name for name.
    expected = {k: v.half().float() for k, v in original.state_dict().items() if k != "proj_out.weight"}
    converted = whisper_state_dict(ct2)
    assert set(converted) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(converted[name], tensor), name

    # The full loader (with the real tokenizer) computes the same function as the rounded original.
    shutil.copy(offline_tiny_en_path() / "tokenizer.json", tmp_path / "tokenizer.json")
    model, text = load_ct2_whisper(tmp_path)
    assert text.prefix == (50257, 50362) and text.eos == 50256
    rounded = tiny_whisper(seed=1)
    rounded.load_state_dict({k: v.half().float() for k, v in original.state_dict().items()})
    features = torch.randn(2, 80, 100)
    tokens = torch.tensor([[50257, 50362, 11, 12], [50257, 50362, 13, 14]])
    with torch.no_grad():
        got = model(input_features=features, decoder_input_ids=tokens).logits
        want = rounded(input_features=features, decoder_input_ids=tokens).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()


def test_real_tiny_en_bundle_transcribes_librivox_recordings():
    model, text = load_whisper("tiny.en-offline")
    assert sum(p.numel() for p in model.parameters()) == 37_760_256  # tiny.en: 37.76M, proj_out tied
    set_input_window(model, seconds=8.0)
    assert input_window_seconds(model) == 8.0
    task = ASRTask(text=text)
    items = librivox_items()
    assert len(items) == 5
    loader = DataLoader(SpeechDataset(items, window_s=8.0), batch_size=5, collate_fn=task.collate_fn())
    assert task.evaluate(model, loader, device=torch.device("cpu")) < 20.0


def test_local_transformers_folder_loads_with_its_tokenizer(tmp_path):
    from transformers import WhisperTokenizerFast

    original = tiny_whisper(seed=2)
    original.save_pretrained(tmp_path)
    WhisperTokenizerFast(tokenizer_file=str(offline_tiny_en_path() / "tokenizer.json")).save_pretrained(tmp_path)
    model, text = load_whisper(tmp_path)
    assert text.prefix == (50257, 50362) and text.eos == 50256
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
