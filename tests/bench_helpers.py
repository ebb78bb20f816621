"""Run an image config the way the tests of the image benchmark read it: the test-phase records only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from orthograd.bench.experiments import run_experiment
from orthograd.image_bench.config import BenchConfig


def run_test_phase(config: BenchConfig | Sequence[BenchConfig], raw: Mapping[str, Any] | None = None,
                **options: Any) -> list[dict[str, Any]]:
    """``run_experiment`` of ``config`` (with ``raw``, the file's mapping); its test-phase records in plan order."""
    return [r for r in run_experiment(config, raw=raw, **options) if r["phase"] == "test"]
