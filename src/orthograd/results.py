"""``UnlearnResult``: what one ``unlearn()`` run produced, and saving it with its audit record."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from orthograd.audit import save_result


@dataclass
class UnlearnResult:
    """What a run produced: the unlearned model and an account of how it got there."""

    model: nn.Module
    method: str
    config: dict[str, Any]
    history: list[dict[str, Any]]
    stop_reason: str  # "target_reached" | "max_epochs" | "one_shot" | "non_finite"
    steps: int
    epochs: int
    wall_time_s: float
    original: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # fingerprints of the forget and retain sets
    missed_target: str | None = None  # why the stop rule's target was not reached, and what to try (None: reached)
    stop_checks: int = 0  # times the stop rule was evaluated (0 without one): the cadence a benchmark compares

    @property
    def final(self) -> dict[str, Any]:
        """The last evaluation row (the state of the returned model)."""
        return self.history[-1]

    def save(self, path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
        """Save the model (safetensors) and a JSON audit record beside it; see ``orthograd.audit``."""
        return save_result(self, path, overwrite=overwrite)
