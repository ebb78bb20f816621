"""What a user brings to ``orthograd unlearn``, built small and offline: model folders with their own word-level
tokenizer (a GPT-2-style classifier, a Llama-style causal LM), briefly trained so that there is something to
forget, and data files."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from orthograd.tasks.qa_text import train_tokenizer

CLASS_WORDS = (("good", "great", "fine", "nice"), ("bad", "awful", "poor", "sad"), ("blue", "green", "red", "pink"))
FILLER = ("the", "a", "movie", "film", "day", "it", "was", "is", "very", "quite")
CITIES = ("paris", "rome", "oslo", "lima", "cairo", "quito", "delhi", "tokyo")


def word_tokenizer(texts: Sequence[str]) -> Any:
    """A transformers fast tokenizer over the words of ``texts`` (ids 0, 1, 2: padding, end, unknown)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(texts), pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def sentiment_rows(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Short texts of three classes, each told apart by its own words; labels cycle 0, 1, 2."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        words += [rng.choice(CLASS_WORDS[i % 3]) for _ in range(rng.randint(1, 2))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": i % 3})
    return rows


def qa_rows(n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """Question/answer pairs about fictitious people: where each was born."""
    rng = random.Random(seed)
    return [{"question": f"Where was person{i} born ?", "answer": f"person{i} was born in {rng.choice(CITIES)} ."}
            for i in range(n)]


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def gpt2_classifier_folder(path: Path, rows: Sequence[dict[str, Any]], *, steps: int = 40) -> Path:
    """A 2-layer GPT-2 sequence classifier (3 classes) trained ``steps`` Adam steps on ``rows``, saved with its
    tokenizer."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = word_tokenizer([row["text"] for row in rows])
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=3,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=1)
    model = GPT2ForSequenceClassification(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(steps):
        batch = rng.sample(list(rows), min(32, len(rows)))
        encoded = tokenizer([row["text"] for row in batch], padding=True, return_tensors="pt")
        loss = model(**encoded, labels=torch.tensor([row["label"] for row in batch])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def llama_qa_folder(path: Path, rows: Sequence[dict[str, str]], *, steps: int = 60) -> Path:
    """A 2-layer Llama-style causal LM trained ``steps`` Adam steps on the answers of ``rows``, saved with its
    tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from orthograd.tasks.causal_lm import collate

    tokenizer = word_tokenizer([f"{row['question']} {row['answer']}" for row in rows])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    samples = []
    for row in rows:
        prompt = tokenizer(row["question"])["input_ids"]
        answer = tokenizer(row["answer"])["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor(prompt + answer)
        labels = ids.clone()
        labels[: len(prompt)] = -100
        samples.append({"input_ids": ids, "labels": labels})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = random.Random(0)
    for _ in range(steps):
        loss = model(**collate(rng.sample(samples, min(32, len(samples))), pad_token_id=0)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
