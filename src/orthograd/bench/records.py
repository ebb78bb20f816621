"""The one record schema: the fields every results-log record has, whatever the task, and the upgrade of older logs.

A record is the envelope below plus the task's own measurements beside it (image classification: accuracies before
and after, UIS, privacy; speech: the WERs; language models: the TOFU metrics). The envelope says what ran (task,
bench, key, phase, method, label, hyperparameters, seed) and how it went (stop reason, steps, epochs, stop-rule
checks, wall time, history, package versions); the engine adds the commit and the config hash
(``bench.provenance``). For a record that measures a model without unlearning (the Original and Retrain rows) the
run fields are None. ``upgrade_record`` reads records written before the schema was shared, so older results
logs still resume and tabulate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orthograd.bench.provenance import package_versions
from orthograd.results import UnlearnResult

Record = dict[str, Any]
# Per task, the fields that records written before the shared schema had under other names.
_RENAMED: dict[str, dict[str, str]] = {
    "asr": {"params": "hyperparameters"},
    "causal_lm": {"params": "hyperparameters", "wall_s": "wall_time_s", "split": "phase"},
}


def record_envelope(
    *,
    task: str,
    bench: str,
    key: str,
    phase: str,
    method: str,
    label: str,
    hyperparameters: Mapping[str, Any],
    seed: int | None,
    result: UnlearnResult | None = None,
) -> Record:
    """The shared fields of a record; ``result`` (None for a record that only measures a model) fills the run's."""
    return {
        "task": task,
        "bench": bench,
        "key": key,
        "phase": phase,
        "method": method,
        "label": label,
        "hyperparameters": dict(hyperparameters),
        "seed": seed,
        "stop_reason": result.stop_reason if result is not None else None,
        "steps": result.steps if result is not None else None,
        "epochs": result.epochs if result is not None else None,
        "stop_checks": result.stop_checks if result is not None else None,
        "missed_target": result.missed_target if result is not None else None,  # why and what to try, if missed
        "wall_time_s": result.wall_time_s if result is not None else None,
        "history": result.history if result is not None else None,
        "versions": package_versions(),
    }


def upgrade_record(record: Mapping[str, Any], *, task: str) -> Record:
    """A ``task`` record in the shared schema: one written before it (no ``task`` field) with its fields renamed and
    ``task`` filled in; a current one unchanged."""
    if "task" in record:
        return dict(record)
    renamed = _RENAMED.get(task, {})
    return {"task": task, **{renamed.get(name, name): value for name, value in record.items()}}
