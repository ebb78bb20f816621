"""Retain damage: a run whose retain metric fell past a tolerance is never reported as plain success.

Forgetting that wrecks what should be kept (a too large learning rate can take a classifier's other classes to
chance in one step) still drives the forget metric to its target, so the stop rule alone would call it a
success. The runner compares every evaluated state's retain metric, and the adaptive schedule's held-out retain
slice, with the original model's; a drop larger than ``DEFAULT_DAMAGE_TOLERANCE`` points (``damage_tolerance=``
of ``unlearn``) is damage: the result carries it (``result.damage``), and a ``RetainDamageWarning`` names the knob.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_DAMAGE_TOLERANCE = 10.0  # metric points (percent) the retain metric may lose before a run is damaged
HOLDOUT_SET = "held-out retain slice"


class RetainDamageWarning(UserWarning):
    """The returned model (or a state the run passed through) lost more retain metric than the tolerance."""


@dataclass(frozen=True)
class HoldoutReading:
    """The adaptive schedule's held-out retain slice: its metric before the run, at the latest check, and its
    sampling noise (a drop within the noise is not evidence of damage)."""

    before: float
    now: float
    noise: float


@dataclass(frozen=True)
class Damage:
    """How far a retain metric fell: which set, the metric's name, its value before and after, the tolerance."""

    set: str
    metric: str
    before: float
    after: float
    tolerance: float

    @property
    def drop(self) -> float:
        """Points lost (the metric's direction taken into account)."""
        return abs(self.before - self.after)

    def describe(self) -> str:
        return (
            f"{self.set} {self.metric} fell from {self.before:.2f} to {self.after:.2f} "
            f"(more than the {self.tolerance:g}-point damage tolerance)"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DamageCheck:
    """Compares a state's retain figures with the original model's (``tolerance`` in metric points)."""

    original_retain: float
    metric: str
    higher_is_better: bool
    tolerance: float

    def of(self, row: Mapping[str, Any], holdout: HoldoutReading | None) -> Damage | None:
        """The worst damage of the state ``row`` shows (None: within tolerance, or nothing measured)."""
        found: list[tuple[float, Damage]] = []
        if "retain" in row:
            drop = self._drop(self.original_retain, row["retain"])
            if drop > self.tolerance:
                found.append((drop, Damage("retain", self.metric, self.original_retain, row["retain"], self.tolerance)))
        if holdout is not None:
            drop = self._drop(holdout.before, holdout.now)
            allowed = max(self.tolerance, holdout.noise)
            if drop > allowed:
                found.append((drop, Damage(HOLDOUT_SET, self.metric, holdout.before, holdout.now, allowed)))
        return max(found, key=lambda pair: pair[0])[1] if found else None

    def _drop(self, before: float, now: float) -> float:
        return before - now if self.higher_is_better else now - before


def check_tolerance(tolerance: float) -> None:
    if not tolerance >= 0:
        raise ValueError(f"damage_tolerance must be >= 0 metric points, got {tolerance}")
