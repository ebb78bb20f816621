"""The ASR task adapter: batch layout, per-utterance loss, WER with clipping, per-sample grads, stop rule, audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from asr_helpers import offline_text, tiny_whisper

from orthograd import per_sample_grads
from orthograd.data.audio import log_mel, resample
from orthograd.lora import LoRAConfig, attach_lora
from orthograd.models.whisper import set_input_window
from orthograd.stopping import resolve_stop
from orthograd.tasks import get_task
from orthograd.tasks.asr import ASRTask
from orthograd.tasks.base import IGNORE_INDEX
from orthograd.wer import normalize, wer

TEXTS = ["the cat sat on the mat", "Hello, world!", "a much longer sentence about seven green apples"]


@pytest.fixture(scope="module")
def task() -> ASRTask:
    return ASRTask(text=offline_text(), max_new_tokens=6)


def _batch(task: ASRTask, texts=TEXTS) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return task.collate([{"input_features": torch.randn(80, 100), "text": t} for t in texts])


def test_collate_scores_text_and_end_token_but_not_prefix_or_padding(task):
    batch = _batch(task)
    text = task.text
    for row, sentence in enumerate(TEXTS):
        ids = text.encode(sentence)
        n = len(ids)
        assert batch["decoder_input_ids"][row, :2].tolist() == list(text.prefix)
        assert batch["decoder_input_ids"][row, 2 : 2 + n].tolist() == ids
        labels = batch["labels"][row].tolist()
        assert labels[0] == IGNORE_INDEX  # the position fed <|startoftranscript|> would predict the forced token
        assert labels[1 : 2 + n] == ids + [text.eos]
        assert all(t == IGNORE_INDEX for t in labels[2 + n :])
    assert task.references(batch) == [" " + t for t in TEXTS]


def test_per_utterance_loss_equals_manual_unpadded_computation(task):
    model = tiny_whisper()
    batch = _batch(task)
    losses = task.per_sample_loss(model, batch)
    text = task.text
    for row, sentence in enumerate(TEXTS):
        sequence = list(text.prefix) + text.encode(sentence) + [text.eos]
        with torch.no_grad():
            logits = model(
                input_features=batch["input_features"][row : row + 1],
                decoder_input_ids=torch.tensor([sequence[:-1]]),
            ).logits[0]
        log_probs = F.log_softmax(logits, dim=-1)
        scored = range(len(text.prefix) - 1, len(sequence) - 1)  # positions that predict text tokens and the end
        manual = -torch.stack([log_probs[i, sequence[i + 1]] for i in scored]).mean()
        assert torch.allclose(losses[row], manual, atol=1e-5)
    assert torch.allclose(task.mean_loss(model, batch), losses.mean())


def test_per_sample_grads_on_whisper_lora_match_single_utterance_backward(task):
    model = attach_lora(tiny_whisper(), LoRAConfig(r=2), seed=0)
    with torch.no_grad():  # make B non-zero so every adapter factor gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = _batch(task)
    grads = per_sample_grads(model, task.per_sample_loss, batch)  # engine="auto": vmap works on Whisper
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(grads) == set(names) and any("encoder_attn" in n for n in names)
    for row in range(len(TEXTS)):
        single = {k: v[row : row + 1] for k, v in batch.items()}
        reference = torch.autograd.grad(
            task.mean_loss(model, single), [dict(model.named_parameters())[n] for n in names]
        )
        for name, ref in zip(names, reference, strict=True):
            assert torch.allclose(grads[name][row], ref, atol=1e-5, rtol=1e-4), name


def test_greedy_decoding_stays_in_text_vocabulary_and_respects_the_cap(task):
    model = tiny_whisper()
    batch = _batch(task)
    hypotheses = task.transcribe(model, batch["input_features"])
    assert len(hypotheses) == 3
    for hyp in hypotheses:
        assert "<|" not in hyp
        assert len(task.text.encode(hyp)) <= task.max_new_tokens + 1


def test_wer_normalises_like_whisper_and_clips_at_100():
    assert normalize("Mr. Smith's colour, 20 apples!") == normalize("mister smith's color twenty apples")
    assert wer(["the cat sat"], ["The cat sat."]) == 0.0
    assert wer(["the cat sat"], ["the dog sat"]) == pytest.approx(100 / 3)
    hallucination = "la " * 30
    assert wer(["the cat sat"], [hallucination]) == 100.0  # 30 errors on 3 words, clipped
    # Per set (default): 30 + 0 errors over 3 + 7 words, clipped to 100. Per utterance: min(30, 3) + 0 over 10.
    refs = ["the cat sat", "the quick brown fox jumps over dogs"]
    hyps = [hallucination, "the quick brown fox jumps over dogs"]
    assert wer(refs, hyps) == 100.0
    assert wer(refs, hyps, clip="utterance") == pytest.approx(30.0)
    assert wer(["the cat sat"], [""]) == 100.0


def test_task_registry_and_speaker_stop_rule():
    assert isinstance(get_task("asr"), ASRTask)
    rule = resolve_stop("speaker", original={})
    assert rule({"forget": 75.0}) and not rule({"forget": 74.9})


def test_audio_resampling_and_windowed_features():
    rate = 22_050
    t = np.arange(rate) / rate
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample(tone, rate=rate)
    assert len(out) == 16_000
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 s of audio: bin index = Hz
    short, full = log_mel(out, window_s=2.0), log_mel(out, window_s=30.0)
    assert short.shape == (80, 200) and full.shape == (80, 3000)
    assert torch.allclose(short, full[:, :200], atol=1e-4)  # the short window is the start of the 30 s one
    with pytest.raises(ValueError, match="longer than"):
        log_mel(out, window_s=0.5)
    model = set_input_window(tiny_whisper(), seconds=0.4)
    assert model.model.encoder.embed_positions.weight.shape[0] == 20
    model(input_features=torch.randn(1, 80, 40), decoder_input_ids=torch.tensor([[50257]]))
    with pytest.raises(ValueError, match="window"):
        set_input_window(model, seconds=0.41)
