"""The one record schema: the fields every results-log record has, whatever the task, and its format version.

A record is the envelope below plus the task's own measurements beside it (image classification: accuracies before
and after, UIS, privacy; speech: the WERs; language models: the TOFU metrics). The envelope says what ran (task,
bench, key, phase, method, label, hyperparameters, seed) and how it went (stop reason, steps, epochs, stop-rule
checks, wall time, history, package versions); as the engine logs a record it adds the format (``FORMAT``), the
commit and the config hash (``bench.provenance``). For a record that measures a model without unlearning (the
Original and Retrain rows) the run fields are None.

The engine and the reports read logs in the current format only (``current_records``); ``bench.upgrade``
(``orthograd upgrade-log FILE``) rewrites an older log in place, atomically; it and each task's ``rekey_format2``
are what knows the older formats.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orthograd.bench.provenance import package_versions
from orthograd.io import ResultsLog
from orthograd.results import UnlearnResult

Record = dict[str, Any]
FORMAT = 3  # the format the engine logs records in (``bench.engine``); ``bench.upgrade`` lists the older ones


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
        "damaged": result.damaged if result is not None else None,  # retain damage beyond the run's tolerance
        "wall_time_s": result.wall_time_s if result is not None else None,
        "history": result.history if result is not None else None,
        "versions": package_versions(),
    }


def record_format(record: Mapping[str, Any]) -> int:
    """The format a record was written in (``FORMAT`` for the envelope written now)."""
    if "format" in record:
        return int(record["format"])
    return 1 if "task" in record else 0


def current_records(path: str | Path) -> list[Record]:
    """The records of the results log at ``path``, or an error naming ``orthograd upgrade-log`` when any is in an
    older format (the engine and the reports read the current one only)."""
    records = ResultsLog(path).records()
    old = sum(record_format(r) < FORMAT for r in records)
    if old:
        raise ValueError(f"{path} holds {old} record(s) in an older format than {FORMAT}: run "
                         f"`orthograd upgrade-log {path}` once to rewrite it, then run this again")
    newer = sorted({record_format(r) for r in records if record_format(r) > FORMAT})
    if newer:
        raise ValueError(f"{path} holds records in format {newer[0]}, newer than this orthograd reads ({FORMAT}): "
                         "upgrade orthograd")
    return records
