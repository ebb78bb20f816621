"""What every task's experiment plans and keeps, owned by the engine: one ``Job``, one key function, one per-process
cache.

A ``Job`` is one record to make, whatever the task: a table row (``label``, ``method``, ``hyperparameters``) with a
``seed``, on one split (``split``: the task's coordinates, e.g. an image split's index and retain size, a speaker,
a forget fraction), in one ``phase`` (validation or test). Its ``digest`` is the record's ``key`` field: the task's
``content_hash`` of everything that changes the record's numbers. Its ``key`` identifies the record in the results
log: ``record_key`` of the fields the task names (``Job.identity``), read off the job now and off the record later,
so a finished job is found whichever process or backend logged it.

``ProcessCache`` holds what a task's jobs share in one process (data, the original model, a corpus), built on
first use and keyed by the config's content, so a worker process loads it once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from orthograd.bench.config import content_hash

T = TypeVar("T")


def record_key(record: Mapping[str, Any], identity: Sequence[str]) -> str:
    """A record's identity in the results log: its ``identity`` fields (``key`` is its digest), as JSON."""
    return json.dumps([record[name] for name in identity])


@dataclass(frozen=True)
class Job:
    """One record to make (see the module); ``extra`` is what running it needs beyond its identity (an image run's
    retrained reference, a speech row's tables), never part of ``key``."""

    phase: str
    label: str
    method: str
    hyperparameters: Mapping[str, Any]
    seed: int | None
    digest: str
    split: Mapping[str, Any]
    identity: tuple[str, ...] = ("key",)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def fields(self) -> dict[str, Any]:
        """The record fields this job determines (its envelope's identity and its split's coordinates)."""
        return {"phase": self.phase, "label": self.label, "method": self.method, "seed": self.seed,
                "key": self.digest, **self.split}

    @property
    def key(self) -> str:
        return record_key(self.fields(), self.identity)


class ProcessCache(Generic[T]):
    """This process's value per config (``build(config)`` on first use), keyed by the config's content;
    ``keep``: how many configs' values to hold (None: every one; 1: the latest, for values too large to pile up in
    a long-lived process)."""

    def __init__(self, build: Callable[[Any], T], *, keep: int | None = None) -> None:
        self._build = build
        self._keep = keep
        self._values: dict[str, T] = {}

    def get(self, config: BaseModel) -> T:
        key = content_hash(config.model_dump(mode="json"))
        if key not in self._values:
            if self._keep is not None and len(self._values) >= self._keep:
                self._values.pop(next(iter(self._values)))
            self._values[key] = self._build(config)
        return self._values[key]

    def clear(self) -> None:
        self._values.clear()
