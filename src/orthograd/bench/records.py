"""The one record schema: the fields every results-log record has, whatever the task, and its format version.

A record is the envelope below plus the task's own measurements beside it (image classification: accuracies before
and after, UIS, privacy; speech: the WERs; language models: the TOFU metrics). The envelope says what ran (task,
bench, key, phase, method, label, hyperparameters, seed) and how it went (stop reason, steps, epochs, stop-rule
checks, wall time, history, package versions); as the engine logs a record it adds the format (``FORMAT``), the
commit and the config hash (``bench.provenance``). For a record that measures a model without unlearning (the
Original and Retrain rows) the run fields are None.

The engine and the reports read logs in the current format only (``current_records``); ``upgrade_log``
(``orthograd upgrade-log FILE``) rewrites an older log in place, atomically. Formats: 0, before the shared envelope
(no ``task``; the speech and language-model records named some fields otherwise); 1, the shared envelope without
``format``; 2, with ``format``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orthograd.bench.provenance import package_versions
from orthograd.io import ResultsLog, atomic_write_text
from orthograd.results import UnlearnResult

Record = dict[str, Any]
FORMAT = 2  # the format the engine logs records in (``bench.engine``)
# Format 0, per task: the fields its records had under other names.
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


def record_format(record: Mapping[str, Any]) -> int:
    """The format a record was written in (``FORMAT`` for the envelope written now)."""
    if "format" in record:
        return int(record["format"])
    return 1 if "task" in record else 0


def _task_of(record: Mapping[str, Any]) -> str:
    """The task of a format-0 record, from the fields only that task's records have."""
    if "speaker" in record:
        return "asr"
    if "fraction" in record:
        return "causal_lm"
    return "classification"


def upgrade_record(record: Mapping[str, Any]) -> Record:
    """``record`` in the current format: a format-0 record gets its task's field names and ``task``; every older one
    gets ``format``."""
    out = dict(record)
    if record_format(out) == 0:
        task = _task_of(out)
        renamed = _RENAMED.get(task, {})
        # format-0 speech records ran on test only and said nothing of their phase
        out = {"task": task, "phase": "test", **{renamed.get(name, name): value for name, value in out.items()}}
    return {**out, "format": FORMAT}


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


def upgrade_log(path: str | Path) -> int:
    """Rewrite the results log at ``path`` in the current format, atomically (a reader sees the old file or the
    new one, never half of each); returns how many records changed. A torn last line is dropped."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: pass a results.jsonl written by `orthograd bench`")
    records = ResultsLog(source).records()
    upgraded = [upgrade_record(r) for r in records]
    changed = sum(new != old for new, old in zip(upgraded, records, strict=True))
    if changed:
        atomic_write_text(source, "".join(json.dumps(r, sort_keys=True) + "\n" for r in upgraded))
    return changed
