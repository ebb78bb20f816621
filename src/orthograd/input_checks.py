"""Input checks at the API boundary, and data fingerprints for the audit record.

Unlearning honours deletion requests, so a run on the wrong data must fail loudly before it starts: forget and
retain sets that share samples, NaN or inf values, labels the model cannot output, a forgotten class with no
samples, inputs the model cannot take, a model that is not an ``nn.Module``. Shared samples are found by index when
both sets are views of the same dataset, otherwise by a hash of their content, and named by their positions.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from orthograd.tasks.batches import dataset_size

DataLike = Dataset | DataLoader


def dataset_of(data: DataLike) -> Dataset:
    """The dataset behind a DataLoader (or the dataset itself). Any sized, indexable dataset works, a Hugging Face
    ``datasets.Dataset`` included (rows as lists or, after ``set_format("torch")``, tensors); a mapping of splits
    (``DatasetDict``) is refused, naming the splits."""
    if isinstance(data, Mapping):
        first = next(iter(data), "train")
        raise TypeError(f"got a mapping of splits {list(data)[:5]}, not a dataset; pass one split: data[{first!r}]")
    return data.dataset if isinstance(data, DataLoader) else data


def base_and_indices(dataset: Dataset) -> tuple[Dataset, np.ndarray]:
    """Resolve nested ``Subset`` views to (underlying dataset, indices into it)."""
    indices = np.arange(dataset_size(dataset))
    while isinstance(dataset, Subset):
        indices = np.asarray(dataset.indices)[indices]
        dataset = dataset.dataset
    return dataset, indices


HashCache = dict[int, list[str]]


class NonFiniteSampleError(ValueError):
    """A sample holds NaN or inf: every loss on it would be non-finite, so the run is refused before it starts."""

    def __init__(self, position: int, name: str = "given") -> None:
        self.position = position
        super().__init__(
            f"sample {position} of the {name} set holds NaN or inf values; drop or repair it (e.g. torch.nan_to_num) "
            "before unlearning: a non-finite input makes every loss on it non-finite"
        )


def check_model(model: object) -> None:
    """Refuse anything that is not an ``nn.Module`` (e.g. ``None``) with what is expected instead."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (the network itself), got {type(model).__name__}; "
            "orthograd.train_classifier trains one on a dataset"
        )
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError(
            f"{type(model).__name__} has tensors on the meta device (built without its weights, e.g. under "
            "init_empty_weights or device='meta'): load its weights first (from_pretrained, or to_empty() and "
            "load_state_dict)"
        )


def sample_hashes(dataset: Dataset, *, cache: HashCache | None = None, name: str = "given") -> list[str]:
    """A content hash per sample (every tensor, array and scalar in it); NaN or inf raise ``NonFiniteSampleError``.

    This is the one pass that reads every sample, so it also checks that the values are finite. ``cache`` (keyed
    by dataset identity) lets the overlap check and the fingerprint of one run read each sample once: for datasets
    that decode files or compute features per item, that read is the expensive part. ``name`` names the set in
    errors.
    """
    if cache is not None and id(dataset) in cache:
        return cache[id(dataset)]
    try:
        hashes = _compute_hashes(dataset)
    except NonFiniteSampleError as exc:
        raise NonFiniteSampleError(exc.position, name) from None
    if cache is not None:
        cache[id(dataset)] = hashes
    return hashes


def _compute_hashes(dataset: Dataset) -> list[str]:
    base, indices = base_and_indices(dataset)
    if isinstance(base, TensorDataset):
        columns = [t[torch.as_tensor(indices, dtype=torch.long)].contiguous().cpu() for t in base.tensors]
        for column in columns:
            _check_finite_rows(column)
        return [_digest(column[i] for column in columns) for i in range(len(indices))]
    hashes = []
    for position, index in enumerate(indices):
        parts = [_as_array(part) for part in tree_flatten(base[int(index)], is_leaf=_is_number_list)[0]]
        if not all(_is_finite(part) for part in parts):
            raise NonFiniteSampleError(position)
        hashes.append(_digest(parts))
    return hashes


def _is_number_list(value: Any) -> bool:
    """A flat list of numbers (token ids, features: what a ``datasets.Dataset`` row holds), hashed as one array
    rather than number by number."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )


def _as_array(part: Any) -> Any:
    return np.asarray(part) if _is_number_list(part) else part


def _check_finite_rows(column: torch.Tensor) -> None:
    if not (column.is_floating_point() or column.is_complex()) or column.numel() == 0:
        return
    bad = ~torch.isfinite(column).reshape(column.shape[0], -1).all(dim=1)
    if bool(bad.any()):
        raise NonFiniteSampleError(int(bad.nonzero()[0, 0]))


def _is_finite(part: Any) -> bool:
    if isinstance(part, torch.Tensor):
        return not (part.is_floating_point() or part.is_complex()) or bool(torch.isfinite(part).all())
    if isinstance(part, np.ndarray):
        return part.dtype.kind not in "fc" or bool(np.isfinite(part).all())
    if isinstance(part, float):
        return math.isfinite(part)
    return True


def _digest(parts: Iterable[Any]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(str(part.dtype).encode() + str(tuple(part.shape)).encode())
            h.update(part.detach().contiguous().cpu().numpy().tobytes())
        elif isinstance(part, np.ndarray):
            h.update(str(part.dtype).encode() + str(part.shape).encode() + np.ascontiguousarray(part).tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def check_disjoint(forget: DataLike, retain: DataLike, *, cache: HashCache | None = None) -> None:
    """Raise if a sample is in both sets (by index into a shared dataset, else by content), naming its positions.

    Reads every sample of both sets (once, with ``cache``), which also refuses NaN or inf values.
    """
    forget_hashes = sample_hashes(dataset_of(forget), cache=cache, name="forget")
    retain_hashes = sample_hashes(dataset_of(retain), cache=cache, name="retain")
    f_base, f_idx = base_and_indices(dataset_of(forget))
    r_base, r_idx = base_and_indices(dataset_of(retain))
    if f_base is r_base:
        pairs, kind = shared_positions(f_idx.tolist(), r_idx.tolist()), "samples (same dataset index)"
    else:
        pairs, kind = shared_positions(forget_hashes, retain_hashes), "identical samples"
    if pairs:
        shown = ", ".join(f"forget[{f}] = retain[{r}]" for f, r in pairs[:5]) + (", ..." if len(pairs) > 5 else "")
        raise ValueError(
            f"forget and retain sets overlap: {len(pairs)} shared {kind}: {shown}. A sample to forget must not be "
            "used to retain performance: remove these from the retain set "
            "(orthograd.data.random_forgetting_split / class_forgetting_split build disjoint splits)"
        )


def shared_positions(forget_keys: list[Any], retain_keys: list[Any]) -> list[tuple[int, int]]:
    """(forget position, retain position) of every retain sample whose key (index or hash) is also in forget."""
    first: dict[Any, int] = {}
    for position, key in enumerate(forget_keys):
        first.setdefault(key, position)
    return [(first[key], position) for position, key in enumerate(retain_keys) if key in first]


def fingerprint(data: DataLike, *, cache: HashCache | None = None, name: str = "given") -> dict[str, Any]:
    """What identifies a dataset in an audit record: its size, a hash of its contents and, for a view of a larger
    dataset (``Subset``), a hash of the indices it selects.

    The content hash covers the samples themselves, so two views with the same indices into different data differ.
    """
    dataset = dataset_of(data)
    base, indices = base_and_indices(dataset)
    hashes = sample_hashes(dataset, cache=cache, name=name)
    record: dict[str, Any] = {
        "size": len(indices),
        "content_hash": hashlib.blake2b("".join(hashes).encode(), digest_size=16).hexdigest(),
    }
    if base is not dataset:
        record["ids_hash"] = hashlib.blake2b(np.asarray(indices, dtype=np.int64).tobytes(), digest_size=16).hexdigest()
    return record
