"""Run (or resume) a speaker-unlearning config: ``SpeakerExperiment`` on the engine, records in the run folder.

The engine (``bench.engine``) writes ``RUN_DIR/results.jsonl`` one record at a time, so an interrupted benchmark
resumes where it stopped, and ``tables.md`` at the end; ``workers`` > 1 runs the jobs in that many processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orthograd.asr_bench.config import SpeakerBenchConfig, load_config
from orthograd.asr_bench.experiment import SpeakerExperiment
from orthograd.bench.engine import Engine, OnRun, Record
from orthograd.bench.executors import ProcessPool


def run_config_file(path: str | Path, overrides: Sequence[str] = (), **kwargs: Any) -> list[Record]:
    """``run(load_config(path, overrides))``: the entry point for ``orthograd bench`` on configs with ``task: asr``."""
    return run(load_config(path, overrides), **kwargs)


def run(config: SpeakerBenchConfig, *, on_record: OnRun | None = None) -> list[Record]:
    """Run the benchmark; returns every record of this config (resumed ones included) and writes ``tables.md``."""
    executor = ProcessPool(workers=config.workers, threads=config.threads_per_worker)
    return Engine(SpeakerExperiment(config), out_dir=config.run_dir(), executor=executor).run(on_run=on_record)


__all__ = ["run", "run_config_file"]
