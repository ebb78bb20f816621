"""Speech recognition with Whisper: teacher-forced per-utterance loss, batched greedy decoding, WER.

A batch is a dict of tensors (what ``collate_fn`` builds from ``SpeechDataset`` items):
``input_features [B, 80, frames]``, ``decoder_input_ids [B, T]`` and ``labels [B, T]``.

Forced prefix tokens are handled once, here, for every method: each utterance's token sequence is
``prefix + text + <|endoftext|>``; the decoder reads all but its last token and is scored on the text tokens and
the end token only (the positions that would "predict" prefix tokens are ``IGNORE_INDEX``, as is right padding).
The per-utterance loss is therefore the mean cross-entropy over that utterance's text tokens plus its end token.
Greedy decoding starts from the same prefix and never emits special tokens (ids above ``<|endoftext|>``).
References for WER are the labels decoded back to text (the batch stays all-tensor, as vmap requires).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers.modeling_outputs import Seq2SeqLMOutput

from orthograd.models.whisper import WhisperText, load_offline_text
from orthograd.tasks.base import IGNORE_INDEX, Task
from orthograd.wer import ClipMode, wer_from_counts, word_errors

DEFAULT_MAX_NEW_TOKENS = 128


def _cache_field() -> str:
    """The decoder-cache keyword of the installed transformers ("cache" since 5.x, "past_key_values" before)."""
    names = {f.name for f in dataclasses.fields(Seq2SeqLMOutput)}
    return "cache" if "cache" in names else "past_key_values"


class ASRTask(Task):
    """Whisper seq2seq: cross-entropy per utterance (mean over its label tokens); WER in percent, clipped at 100.

    ``text`` is the model's tokenizer and decoding prefix (``load_whisper`` returns it); by default the offline
    tiny.en codec, so ``task="asr"`` works for English-only Whisper models. ``max_new_tokens`` caps greedy
    decoding; ``clip`` is where WER is clipped ("set" or "utterance", see ``orthograd.wer``).
    """

    name: ClassVar[str] = "asr"
    metric: str = "wer"
    higher_is_better: ClassVar[bool] = False

    def __init__(
        self,
        *,
        text: WhisperText | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        clip: ClipMode = "set",
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if clip not in ("set", "utterance"):
            raise ValueError(f"clip must be 'set' or 'utterance', got {clip!r}")
        self._text = text
        self.max_new_tokens = max_new_tokens
        self.clip: ClipMode = clip

    @property
    def text(self) -> WhisperText:
        if self._text is None:
            self._text = load_offline_text()
        return self._text

    def logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        out = model(
            input_features=batch["input_features"], decoder_input_ids=batch["decoder_input_ids"], use_cache=False
        )
        logits: torch.Tensor = out.logits
        return logits

    def targets(self, batch: Any) -> torch.Tensor:
        labels: torch.Tensor = batch["labels"]
        return labels

    def replace_targets(self, batch: Any, targets: torch.Tensor) -> Any:
        """Labels replaced (e.g. sampled for a Fisher estimate); decoder inputs stay those of the original text."""
        if targets.shape != batch["labels"].shape:
            raise ValueError(
                f"targets of shape {tuple(targets.shape)} do not match labels {tuple(batch['labels'].shape)}"
            )
        return {**batch, "labels": targets}

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return {key: value.to(device, non_blocking=True) for key, value in batch.items()}

    def collate_fn(self) -> Any:
        return self.collate

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack features and build right-padded decoder inputs and labels from the transcripts."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        text = self.text
        prefix = list(text.prefix)
        sequences = [prefix + text.encode(str(item["text"])) + [text.eos] for item in items]
        length = max(len(s) for s in sequences) - 1
        inputs = torch.full((len(items), length), text.eos, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        for row, seq in enumerate(sequences):
            inputs[row, : len(seq) - 1] = torch.tensor(seq[:-1])
            labels[row, len(prefix) - 1 : len(seq) - 1] = torch.tensor(seq[len(prefix) :])
        features = torch.stack([torch.as_tensor(item["input_features"], dtype=torch.float32) for item in items])
        return {"input_features": features, "decoder_input_ids": inputs, "labels": labels}

    def references(self, batch: Any) -> list[str]:
        """The transcripts of a batch, read back from its labels."""
        return [self.text.decode([int(t) for t in row if t != IGNORE_INDEX]) for row in batch["labels"].cpu()]

    @torch.no_grad()
    def transcribe(self, model: nn.Module, input_features: torch.Tensor) -> list[str]:
        """Batched greedy decoding from the forced prefix, up to ``max_new_tokens`` tokens per utterance."""
        text = self.text
        batch_size, device = input_features.shape[0], input_features.device
        encoder_out = model.get_encoder()(input_features=input_features)  # type: ignore[operator]  # Whisper's method
        tokens = torch.tensor([list(text.prefix)] * batch_size, device=device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        generated: list[torch.Tensor] = []
        cache_field = _cache_field()
        past, step_input = None, tokens
        for _ in range(self.max_new_tokens):
            out = model(
                encoder_outputs=encoder_out, decoder_input_ids=step_input, use_cache=True, **{cache_field: past}
            )
            scores = out.logits[:, -1, :]
            scores[:, text.eos + 1 :] = float("-inf")  # no special tokens inside a transcript
            next_token = scores.argmax(dim=-1).masked_fill(finished, text.eos)
            generated.append(next_token)
            finished |= next_token == text.eos
            if bool(finished.all()):
                break
            past, step_input = getattr(out, cache_field), next_token[:, None]
        ids = torch.stack(generated, dim=1).cpu().tolist()
        return [text.decode(row[: row.index(text.eos)] if text.eos in row else row) for row in ids]

    def evaluate(self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device) -> float:
        """WER in percent over ``loader`` (greedy transcripts vs reference transcripts), clipped at 100."""
        counts = self.error_counts(model, loader, device=device)
        return wer_from_counts(counts, clip=self.clip)

    def error_counts(self, model: nn.Module, loader: DataLoader[Any], *, device: torch.device) -> list[tuple[int, int]]:
        """Per utterance ``(word errors, reference words)``."""
        was_training = model.training
        model.eval()
        counts: list[tuple[int, int]] = []
        try:
            for batch in loader:
                batch = self.to_device(batch, device)
                hypotheses = self.transcribe(model, batch["input_features"])
                counts.extend(word_errors(self.references(batch), hypotheses))
        finally:
            model.train(was_training)
        if not counts:
            raise ValueError("cannot evaluate WER on an empty set")
        return counts
