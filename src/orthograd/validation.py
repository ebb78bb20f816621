"""Input checks at the API boundary, and data fingerprints for the audit record.

Unlearning honours deletion requests, so a run on the wrong data must fail loudly before it starts: forget and
retain sets that share samples, labels the model cannot output, a forgotten class with no samples, inputs the
model cannot take. Samples are identified by index when both sets are views of the same dataset, otherwise by a
hash of their content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils._pytree import tree_flatten

DataLike = Dataset | DataLoader


def dataset_of(data: DataLike) -> Dataset:
    """The dataset behind a DataLoader (or the dataset itself)."""
    return data.dataset if isinstance(data, DataLoader) else data


def base_and_indices(dataset: Dataset) -> tuple[Dataset, np.ndarray]:
    """Resolve nested ``Subset`` views to (underlying dataset, indices into it)."""
    indices = np.arange(len(dataset))  # type: ignore[arg-type]
    while isinstance(dataset, Subset):
        indices = np.asarray(dataset.indices)[indices]
        dataset = dataset.dataset
    return dataset, indices


HashCache = dict[int, list[str]]


def sample_hashes(dataset: Dataset, *, cache: HashCache | None = None) -> list[str]:
    """A content hash per sample (every tensor, array and scalar in it).

    ``cache`` (keyed by dataset identity) lets the overlap check and the fingerprint of one run read each sample
    once: for datasets that decode files or compute features per item, that read is the expensive part.
    """
    if cache is not None and id(dataset) in cache:
        return cache[id(dataset)]
    hashes = _compute_hashes(dataset)
    if cache is not None:
        cache[id(dataset)] = hashes
    return hashes


def _compute_hashes(dataset: Dataset) -> list[str]:
    base, indices = base_and_indices(dataset)
    if isinstance(base, TensorDataset):
        columns = [t[torch.as_tensor(indices, dtype=torch.long)].contiguous().cpu() for t in base.tensors]
        return [_digest(column[i] for column in columns) for i in range(len(indices))]
    return [_digest(tree_flatten(base[int(i)])[0]) for i in indices]


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
    """Raise if a sample is in both sets (by index into a shared dataset, else by content)."""
    f_base, f_idx = base_and_indices(dataset_of(forget))
    r_base, r_idx = base_and_indices(dataset_of(retain))
    if f_base is r_base:
        shared = np.intersect1d(f_idx, r_idx)
        kind = "indices"
        examples = shared[:5].tolist()
    else:
        f_hashes = set(sample_hashes(dataset_of(forget), cache=cache))
        shared_hashes = [h for h in sample_hashes(dataset_of(retain), cache=cache) if h in f_hashes]
        shared = np.asarray(shared_hashes)
        kind = "identical samples"
        examples = [h[:12] for h in shared_hashes[:3]]
    if shared.size:
        raise ValueError(
            f"forget and retain sets overlap: {shared.size} shared {kind} (e.g. {examples}). A sample to forget must "
            "not be used to retain performance: remove the forget samples from the retain set "
            "(orthograd.data.random_forgetting_split / class_forgetting_split build disjoint splits)"
        )


def fingerprint(data: DataLike, *, cache: HashCache | None = None) -> dict[str, Any]:
    """What identifies a dataset in an audit record: its size and a hash of its sample ids or contents."""
    dataset = dataset_of(data)
    base, indices = base_and_indices(dataset)
    if base is not dataset:
        digest = hashlib.blake2b(np.asarray(indices, dtype=np.int64).tobytes(), digest_size=16).hexdigest()
        return {"size": int(len(indices)), "ids_hash": digest, "by": "index"}
    digest = hashlib.blake2b("".join(sample_hashes(dataset, cache=cache)).encode(), digest_size=16).hexdigest()
    return {"size": int(len(indices)), "content_hash": digest, "by": "content"}
