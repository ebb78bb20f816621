"""Shared fixtures (a small digits model trained once per test session) and the suite's markers by file."""

from __future__ import annotations

import pytest
import torch

from orthograd.data import load_digits_dataset
from orthograd.models import SmallCNN
from orthograd.training import train_classifier

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Markers (registered in pyproject.toml; `make test-fast` deselects all four) by test file, or by test for `slow`.
MARKERS_BY_FILE_PREFIX = {"test_asr_": "asr", "test_sweep.py": "ray", "test_distributed.py": "distributed"}
SLOW_TESTS = frozenset({  # more than about 20 s each on the project's 2 shared cores
    "test_long_run_memory_stays_flat",
    "test_cifar10_resnet18_config_runs_on_generated_batches",
    "test_a_killed_bench_resumes_without_losing_or_duplicating_runs",
    "test_duck_reduces_forget_accuracy",
    "test_finetune_does_not_forget_even_with_a_larger_learning_rate",
    "test_privacy_metrics_with_retrained_reference_reports_gaps",
    "test_attacks_on_a_model_match_precomputed_losses_and_detect_memorisation",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for prefix, marker in MARKERS_BY_FILE_PREFIX.items():
            if item.path.name.startswith(prefix):
                item.add_marker(marker)
        if getattr(item, "originalname", item.name) in SLOW_TESTS:
            item.add_marker("slow")


@pytest.fixture(scope="session")
def digits():
    """(train, test) TensorDatasets of scikit-learn's digits."""
    return load_digits_dataset()


@pytest.fixture(scope="session")
def digits_model(digits):
    """A SmallCNN trained on digits to ~98% test accuracy (shared: tests must not modify it; copy first)."""
    torch.manual_seed(0)
    return train_classifier(SmallCNN(), digits[0], epochs=12, device="cpu")
