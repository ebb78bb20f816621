"""scikit-learn's 1,797 real 8x8 handwritten digits as train/test TensorDatasets (ships with scikit-learn)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


def load_digits_dataset(*, test_fraction: float = 0.25, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Stratified train/test split of the digits as ``(images [N,1,8,8] in [0,1], labels)`` datasets."""
    from sklearn.datasets import load_digits  # on first use: `import orthograd` loads this module
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )

    def subset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]))

    return subset(train_idx), subset(test_idx)
