"""What a batch may look like, shared by the task adapters: ``(inputs, labels)`` pairs or Hugging Face style dicts.

A dict batch holds the model's keyword inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...) and its
target under ``labels`` (``label``, the name of many datasets, is accepted as transformers' collators accept it);
``-100`` marks a label to ignore, as in transformers. A model may return a tensor or a ``ModelOutput`` (its
``logits`` are used). A batch of any other shape gets an error that says what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Sized
from typing import Any, TypeVar, cast

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from orthograd.tasks.base import IGNORE_INDEX

T = TypeVar("T")

LABEL_KEYS: tuple[str, ...] = ("labels", "label")
EXPECTED = "an (inputs, labels) pair or a dict of model inputs with 'labels' (Hugging Face style)"


def describe(value: Any) -> str:
    """A short account of a batch's structure for error messages, e.g. ``tuple(Tensor[4, 8], Tensor[4], list[4])``."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)}"
    if isinstance(value, Mapping):
        return "dict(" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + ")"
    if isinstance(value, (tuple, list)):
        if len(value) > 8 or not all(isinstance(v, (torch.Tensor, Mapping, tuple, list)) for v in value):
            return f"{type(value).__name__}[{len(value)}] of {type(value[0]).__name__ if value else 'nothing'}"
        return f"{type(value).__name__}(" + ", ".join(describe(v) for v in value) + ")"
    return type(value).__name__


def label_key(batch: Mapping[str, Any]) -> str:
    """The key holding a dict batch's target; a dict without one is a clear error."""
    for key in LABEL_KEYS:
        if key in batch:
            return key
    raise ValueError(f"expected {EXPECTED}; got a dict without 'labels': {describe(batch)}")


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(model inputs, labels)`` of a batch: a tensor (or tuple) of inputs, or a dict of keyword inputs."""
    if isinstance(batch, Mapping):
        key = label_key(batch)
        return {k: v for k, v in batch.items() if k != key}, batch[key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    extra = ""
    if isinstance(batch, (tuple, list)) and len(batch) > 2:
        extra = (
            f" ({len(batch)} elements: for (inputs, labels, index) triples, wrap the dataset so that it yields "
            "(inputs, labels) or a dict)"
        )
    raise ValueError(f"expected {EXPECTED}; got {describe(batch)}{extra}")


def with_labels(batch: Any, labels: torch.Tensor) -> Any:
    """The same batch with other labels."""
    if isinstance(batch, Mapping):
        return {**batch, label_key(batch): labels}
    inputs, _ = split_batch(batch)
    return inputs, labels


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Logits of ``model`` on ``inputs``: dicts as keyword arguments; a ``ModelOutput``'s ``logits``."""
    output = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return output_logits(output)


def output_logits(output: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself, or the ``logits`` of a ``ModelOutput`` (or dict)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ValueError(
        f"the model returned {describe(output)}; expected a tensor of logits or an output with a 'logits' field "
        "(a transformers ModelOutput)"
    )


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch to ``device``; a field that is not a tensor (e.g. raw text) is a clear error."""
    if isinstance(batch, Mapping):
        return {key: _move(value, device, where=f"field {key!r}") for key, value in batch.items()}
    inputs, labels = split_batch(batch)
    moved = (
        inputs.to(device, non_blocking=True)
        if isinstance(inputs, torch.Tensor)
        else _move(inputs, device, where="inputs")
    )
    return moved, _move(labels, device, where="labels")


def _move(value: Any, device: torch.device, *, where: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _move(v, device, where=f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(v.to(device, non_blocking=True) for v in value)
    raise ValueError(
        f"the batch's {where} is {describe(value)}, not a tensor; every field a model reads must be a tensor "
        "(tokenize text in the dataset, or drop the field, e.g. a datasets.Dataset's .remove_columns([...]))"
    )


def resolve_pad_token_id(model: nn.Module, *, given: int | None, tokenizer: Any = None, task: str) -> int:
    """The pad token id for ``model``: its ``config.pad_token_id``, else the tokenizer's, else ``given``, else 0.

    Models that locate the last token by it (GPT-2's classifier) score wrongly with another value, so a setting
    that disagrees with the model's config (or the tokenizer's) is an error naming both.
    """
    sources = {
        "the model's config.pad_token_id": getattr(getattr(model, "config", None), "pad_token_id", None),
        "the tokenizer's pad_token_id": getattr(tokenizer, "pad_token_id", None),
        f"{task}(pad_token_id=)": given,
    }
    known = {name: value for name, value in sources.items() if isinstance(value, int)}
    if len(set(known.values())) > 1:
        shown = ", ".join(f"{name} = {value}" for name, value in known.items())
        raise ValueError(f"pad token ids disagree: {shown}; drop the {task} setting or make them equal")
    return next(iter(known.values()), 0)


def pad_collate(items: Sequence[Any], *, pad_token_id: int = 0) -> Any:
    """Collate dict samples, right-padding 1-D sequence fields of unequal length; anything else as PyTorch does.

    Padding values: ``labels`` -100 (ignored), ``attention_mask`` 0, every other field ``pad_token_id``; padded
    ``input_ids`` without an ``attention_mask`` get one (1 on the tokens, 0 on the padding).
    """
    if not items or not isinstance(items[0], Mapping):
        return default_collate(list(items))
    out: dict[str, Any] = {}
    lengths: list[int] | None = None
    for key in items[0]:
        values = [item[key] for item in items]
        if all(isinstance(v, (list, torch.Tensor)) for v in values):
            tensors = [torch.as_tensor(v) for v in values]
            if all(t.dim() == 1 for t in tensors) and len({t.shape[0] for t in tensors}) > 1:
                pad = IGNORE_INDEX if key in LABEL_KEYS else 0 if key == "attention_mask" else pad_token_id
                out[key] = nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad)
                lengths = lengths if key != "input_ids" else [t.shape[0] for t in tensors]
                continue
            values = tensors
        out[key] = default_collate(values)
    if lengths is not None and "attention_mask" not in out:  # padding must not be attended to
        out["attention_mask"] = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return out


def as_dataset(items: Sequence[T]) -> Dataset[T]:
    """``items`` as a DataLoader's dataset: a sequence is a map-style dataset (``__getitem__`` and ``__len__``),
    which torch's annotations spell ``Dataset``."""
    return cast(Dataset[T], items)


def dataset_size(dataset: Dataset[Any]) -> int:
    """``len(dataset)``: a map-style dataset defines ``__len__``, which torch's ``Dataset`` annotation leaves out."""
    return len(cast(Sized, dataset))
