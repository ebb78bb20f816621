"""Question/answer text as causal-LM samples: a word-level tokenizer trained on the corpus, answer-only labels.

A sample is ``"Question: <q> Answer:"`` followed by the answer and an end token; its labels are -100 on the
prompt and the token ids on the answer and the end token, the layout ``task="causal_lm"`` expects. The tokenizer
is a ``tokenizers`` word-level model (words and punctuation; a closed fictitious corpus needs no sub-words).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class QAEncoder:
    """Turns (question, answer) text into ``{"input_ids", "labels"}`` samples and token ids back into text."""

    tokenizer: Any

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.token_to_id(PAD))

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.token_to_id(EOS))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def item(self, question: str, answer: str) -> dict[str, torch.Tensor]:
        """One sample: prompt tokens unlabelled, answer tokens and the end token labelled."""
        prompt = self.tokenizer.encode(f"Question: {question} Answer:").ids
        reply = [*self.tokenizer.encode(answer).ids, self.eos_token_id]
        ids = torch.tensor(prompt + reply)
        labels = ids.clone()
        labels[: len(prompt)] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (the end token and padding dropped), e.g. for ROUGE-L."""
        return self.tokenizer.decode([i for i in ids if i not in (self.eos_token_id, self.pad_token_id)])
