"""Question/answer text as causal-LM samples: a tokenizer trained on the corpus (or a model's own), answer-only labels.

A sample is ``"Question: <q> Answer:"`` followed by the answer and an end token; its labels are -100 on the
prompt and the token ids on the answer and the end token, the layout ``task="causal_lm"`` expects. The tokenizer
is a ``tokenizers.Tokenizer``: a word-level model (``train_tokenizer``: words and punctuation, enough for a closed
corpus), a byte-level BPE (``train_bpe_tokenizer``: sub-words over bytes, as GPT-2 and Llama 3 use) or the one
saved in a Hugging Face model folder (``load_folder_encoder``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orthograd.tasks.base import IGNORE_INDEX

PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"


def train_tokenizer(texts: Iterable[str]) -> Any:
    """A word-level ``tokenizers.Tokenizer`` over ``texts``; ids 0, 1, 2 are padding, end and unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=[PAD, EOS, UNK]))
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` of at most ``vocab_size`` tokens over ``texts`` (every byte is a
    token, so no text is unknown); ids 0, 1, 2 are padding, end and unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_folder_encoder(folder: str | Path) -> QAEncoder:
    """The encoder of a Hugging Face model folder: its ``tokenizer.json`` and the end (and padding, else end)
    token named in ``tokenizer_config.json``."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder} has no tokenizer.json: save the tokenizer beside the model "
                         "(tokenizer.save_pretrained(folder) with a fast tokenizer)")
    settings = json.loads((folder / "tokenizer_config.json").read_text()) if (
        folder / "tokenizer_config.json").is_file() else {}

    def named(key: str) -> str | None:
        value = settings.get(key)
        return value.get("content") if isinstance(value, dict) else value

    eos = named("eos_token")
    if eos is None:
        raise ValueError(f"{folder}/tokenizer_config.json names no eos_token: the answers need an end token")
    return QAEncoder(Tokenizer.from_file(str(folder / "tokenizer.json")), pad_token=named("pad_token") or eos,
                     eos_token=eos)


@dataclass(frozen=True)
class QAEncoder:
    """Turns (question, answer) text into ``{"input_ids", "labels"}`` samples and token ids back into text;
    ``pad_token`` and ``eos_token`` name the tokenizer's padding and end tokens."""

    tokenizer: Any
    pad_token: str = PAD
    eos_token: str = EOS

    def __post_init__(self) -> None:
        for name in (self.pad_token, self.eos_token):
            if self.tokenizer.token_to_id(name) is None:
                raise ValueError(f"the tokenizer has no token {name!r}; name its padding and end tokens")

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.token_to_id(self.pad_token))

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.token_to_id(self.eos_token))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def item(self, question: str, answer: str) -> dict[str, torch.Tensor]:
        """One sample: prompt tokens unlabelled, answer tokens and the end token labelled."""
        prompt = self.tokenizer.encode(f"Question: {question} Answer:").ids
        reply = [*self.tokenizer.encode(answer, add_special_tokens=False).ids, self.eos_token_id]
        ids = torch.tensor(prompt + reply)
        labels = ids.clone()
        labels[: len(prompt)] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (the end token and padding dropped), e.g. for ROUGE-L."""
        text: str = self.tokenizer.decode([i for i in ids if i not in (self.eos_token_id, self.pad_token_id)])
        return text.strip()
