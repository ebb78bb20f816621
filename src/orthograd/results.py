"""``UnlearnResult``: what one ``unlearn()`` run produced, and saving it with its audit record."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orthograd._version import __version__
from orthograd.audit import save_weights, source_commit
from orthograd.damage import Damage
from orthograd.model_folder import save_model_folder
from orthograd.narration import PREFIX, SETS, before_after, plural


@dataclass
class UnlearnResult:
    """What a run produced: the unlearned model and an account of how it got there."""

    model: nn.Module
    method: str
    config: dict[str, Any]
    history: list[dict[str, Any]]
    # "target_reached" | "max_epochs" | "max_steps" | "one_shot" | "non_finite" | "retain_damage" (the state that
    # ended the run was damaged; the most-forgotten state within tolerance was returned instead)
    stop_reason: str
    steps: int
    epochs: int
    wall_time_s: float
    original: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # fingerprints of the forget and retain sets
    missed_target: str | None = None  # why the stop rule's target was not reached, and what to try (None: reached)
    damage: Damage | None = None  # the returned model's retain damage past the tolerance (None: within it)
    inferred_stop: str | None = None  # the stop rule a call without stop= inferred ("class", "random"; None: none)
    stop_checks: int = 0  # times the stop rule was evaluated (0 without one): the cadence a benchmark compares

    @property
    def damaged(self) -> bool:
        """True when the returned model lost more retain metric than the damage tolerance (see ``damage``)."""
        return self.damage is not None

    def summary(self) -> str:
        """A few readable lines: what ran, how it ended, a before/after table, damage and a missed target."""
        stop = f", stop {self.inferred_stop!r} (inferred)" if self.inferred_stop else ""
        lines = [
            f"{self.method} (seed {self.seed}{stop}): {self.stop_reason} after {plural(self.steps, 'step')}, "
            f"{plural(self.epochs, 'epoch')}, {self.wall_time_s:.1f} s",
            f"{'':8}{'before':>9}{'after':>9}",
        ]
        lines += [f"{name:8}{self.original[name]:9.2f}{self.final[name]:9.2f}" for name in SETS
                  if name in self.original and name in self.final]
        if self.damage is not None:
            lines.append(f"damaged: {self.damage.describe()}")
        if self.missed_target:
            lines.append(f"missed target: {self.missed_target}")
        return "\n".join(lines)

    def end_line(self) -> str:
        """``orthograd: <method> <stop reason> after N steps (E epochs, T s); forget a -> b, ...`` plus damage."""
        line = (
            f"{PREFIX} {self.method} {self.stop_reason} after {plural(self.steps, 'step')} "
            f"({plural(self.epochs, 'epoch')}, {self.wall_time_s:.1f} s); {before_after(self.original, self.final)}"
        )
        if self.damage is not None:
            line += f"; DAMAGED: {self.damage.describe()}"
        elif "restored_from_step" in self.final:
            line += f"; returned the state of step {self.final['restored_from_step']}"
        return line

    def __repr__(self) -> str:
        return f"<UnlearnResult {self.end_line()}>"

    @property
    def final(self) -> dict[str, Any]:
        """The last evaluation row (the state of the returned model)."""
        return self.history[-1]

    def account(self) -> dict[str, Any]:
        """What the run did, for an audit record: model class, method, config, seed, data fingerprints, metrics
        before and after, stop reason (and the inferred stop rule), retain damage past the tolerance (None: within
        it), versions, source commit and time."""
        return {
            "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "method": self.method,
            "config": self.config,
            "seed": self.seed,
            "data": self.data,
            "metrics": {"before": self.original, "after": self.final},
            "stop_reason": self.stop_reason,
            "steps": self.steps,
            "epochs": self.epochs,
            "wall_time_s": self.wall_time_s,
            "inferred_stop": self.inferred_stop,
            "damage": self.damage.to_dict() if self.damage is not None else None,
            "versions": {"orthograd": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "commit": source_commit(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
        """Save the model (safetensors) and a JSON audit record beside it; see ``orthograd.audit``."""
        return save_weights(self.model, path, account=self.account(), overwrite=overwrite)

    def save_pretrained(
        self,
        path: str | Path,
        *,
        tokenizer: Any = None,
        factory: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Save the model as a folder that loads as it is, with the audit record inside (``audit.json``).

        A transformers or peft model is written by its own ``save_pretrained`` (``from_pretrained`` loads the
        folder), with ``tokenizer`` beside it when given; any other module as ``model.safetensors`` plus the
        ``factory`` (``"package.module:callable"``, default: its class, called without arguments) that
        ``orthograd.load`` rebuilds it with. ``orthograd.load(path)`` returns (model, audit record). The folder
        appears complete or not at all; a non-empty one is replaced only with ``overwrite=True``.
        """
        return save_model_folder(self.model, path, audit=self.account(), tokenizer=tokenizer, factory=factory,
                                 overwrite=overwrite)
