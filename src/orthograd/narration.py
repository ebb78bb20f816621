"""Saying what ran: the one-line account printed when a run starts and ends, and ``UnlearnResult.summary()``.

Facts a user needs to trust a run (which engine computed the gradients, what LoRA adapts, how much of the retain
set was held out, the budget, the stop rule and whether it was inferred) are stated up front; the end line says
how the run ended and the metrics before -> after. Lines go to stderr, as progress and warnings do.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from orthograd.damage import Damage


class UnlearnResult(Protocol):
    """What the end line and the summary read of an ``orthograd.results.UnlearnResult``."""

    method: str
    stop_reason: str
    steps: int
    epochs: int
    wall_time_s: float
    seed: int
    original: dict[str, float]
    missed_target: str | None
    damage: Damage | None
    inferred_stop: str | None

    @property
    def final(self) -> dict[str, Any]: ...

SETS = ("forget", "retain", "test")
PREFIX = "orthograd:"


def say(line: str) -> None:
    """Print ``line`` to stderr, once per run: in a torch.distributed run only rank 0 speaks."""
    if _is_secondary_rank():
        return
    print(line, file=sys.stderr, flush=True)


def _is_secondary_rank() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def start_line(*, method: str, facts: Sequence[str]) -> str:
    """``orthograd: <method> | fact | fact ...``."""
    return " | ".join([f"{PREFIX} {method} starts", *facts])


def trainable_fact(*, trainable: int, total: int, lora_targets: Sequence[str] | None) -> str:
    where = f" (LoRA on {_shorten(lora_targets)})" if lora_targets else ""
    return f"trains {trainable:,} of {total:,} parameters{where}"


def budget_fact(*, max_epochs: int | None, max_steps: int | None) -> str:
    parts = [_count(n, unit) for n, unit in ((max_epochs, "epoch"), (max_steps, "step")) if n is not None]
    return "budget " + " or ".join(parts)


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def stop_fact(stop: object, *, inferred: tuple[str, str] | None) -> str:
    if inferred is not None:
        return f"stop {inferred[0]!r} (inferred: {inferred[1]})"
    if stop is None:
        return "no stop rule (none could be inferred): runs the whole budget"
    return f"stop {stop!r}" if isinstance(stop, str) else f"stop {getattr(stop, '__name__', None) or stop!r}"


def before_after(original: Mapping[str, float], final: Mapping[str, Any]) -> str:
    return ", ".join(f"{name} {original[name]:.2f} -> {final[name]:.2f}" for name in SETS
                     if name in original and name in final)


def end_line(result: UnlearnResult) -> str:
    """``orthograd: <method> <stop reason> after N steps (E epochs, T s); forget a -> b, ...`` plus damage."""
    line = (
        f"{PREFIX} {result.method} {result.stop_reason} after {_count(result.steps, 'step')} "
        f"({_count(result.epochs, 'epoch')}, {result.wall_time_s:.1f} s); {before_after(result.original, result.final)}"
    )
    if result.damage is not None:
        line += f"; DAMAGED: {result.damage.describe()}"
    elif "restored_from_step" in result.final:
        line += f"; returned the state of step {result.final['restored_from_step']}"
    return line


def summary_lines(result: UnlearnResult) -> list[str]:
    """What ``UnlearnResult.summary()`` prints: method and stop, how it ended, a before/after table, warnings."""
    stop = f", stop {result.inferred_stop!r} (inferred)" if result.inferred_stop else ""
    lines = [
        f"{result.method} (seed {result.seed}{stop}): {result.stop_reason} after {_count(result.steps, 'step')}, "
        f"{_count(result.epochs, 'epoch')}, {result.wall_time_s:.1f} s",
        f"{'':8}{'before':>9}{'after':>9}",
    ]
    lines += [f"{name:8}{result.original[name]:9.2f}{result.final[name]:9.2f}" for name in SETS
              if name in result.original and name in result.final]
    if result.damage is not None:
        lines.append(f"damaged: {result.damage.describe()}")
    if result.missed_target:
        lines.append(f"missed target: {result.missed_target}")
    return lines


def _shorten(names: Sequence[str], *, shown: int = 4) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} modules)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
