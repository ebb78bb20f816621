"""Shared fixtures: a small digits model trained once per test session."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from orthograd.data import load_digits_dataset
from orthograd.models import SmallCNN

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def train_classifier(model: torch.nn.Module, dataset, *, epochs: int, lr: float = 3e-3, seed: int = 0) -> torch.nn.Module:
    """Plain Adam training used to make 'original' models for tests."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(epochs):
        for inputs, labels in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits():
    """(train, test) TensorDatasets of scikit-learn's digits."""
    return load_digits_dataset()


@pytest.fixture(scope="session")
def digits_model(digits):
    """A SmallCNN trained on digits to ~98% test accuracy (shared: tests must not modify it; copy first)."""
    torch.manual_seed(0)
    return train_classifier(SmallCNN(), digits[0], epochs=12)
