"""Saying what ran: the one-line account printed when a run starts, and the pieces of the end line.

Facts a user needs to trust a run (which engine computed the gradients, what LoRA adapts, how much of the retain
set was held out, the budget, the stop rule and whether it was inferred) are stated up front; the end line
(``UnlearnResult.end_line()``) says how the run ended and the metrics before -> after. Lines go to stderr, as
progress and warnings do.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

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
    parts = [plural(n, unit) for n, unit in ((max_epochs, "epoch"), (max_steps, "step")) if n is not None]
    return "budget " + " or ".join(parts)


def plural(n: int, unit: str) -> str:
    """``1 step``, ``2 steps``."""
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


def _shorten(names: Sequence[str], *, shown: int = 4) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} modules)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
