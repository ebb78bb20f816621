"""Where and with what randomness a run executes: device resolution and seeding.

Kept apart from ``api`` so that evaluation, training, privacy checks and the benchmarks resolve devices and seeds
the same way without importing the unlearning runner.
"""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (CUDA when available and none is named); an unknown or absent device is a clear error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but CUDA is not available here; use device='cpu'")
    if resolved.type == "meta":
        raise ValueError("device 'meta' holds no values and cannot run a model; use device='cpu' or 'cuda'")
    if resolved.type != "cpu" and not _available(resolved.type):
        raise ValueError(f"device {str(device)!r} was requested but {resolved.type} is not available here; "
                         f"use device='cpu'{' or cuda' if torch.cuda.is_available() else ''}")
    return resolved


def _available(kind: str) -> bool:
    """Whether torch can run on a device type here (``torch.<kind>.is_available()``, mps through its backend)."""
    module = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
    check = getattr(module, "is_available", None)
    return bool(check()) if callable(check) else False


def seeded_generator(seed: int) -> torch.Generator:
    """Seed torch's global generator with ``seed`` and return a fresh CPU generator seeded the same way.

    The global seed fixes what modules draw at construction (LoRA adapters, dropout); the returned generator is
    the run's own stream (data shuffling), so that the two do not consume each other's numbers.
    """
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
