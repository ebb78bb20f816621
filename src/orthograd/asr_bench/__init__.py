"""Speaker unlearning benchmark for Whisper (paper Section 5.3, Tables 1 and 2), offline (espeak) or LibriSpeech.

    from orthograd.bench.experiments import run_experiment
    records = run_experiment("configs/espeak_speaker_smoke.yaml", overrides=["speakers.count=1"])

``orthograd bench CONFIG.yaml`` (and ``run_experiment``) runs configs with ``task: asr`` as
``experiment.SpeakerExperiment`` on the engine (``bench.engine``). The names load on first use, so
``orthograd.asr_bench.config`` imports without the speech stack (transformers).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SpeakerBenchConfig": "orthograd.asr_bench.config",
    "load_config": "orthograd.asr_bench.config",
    "SpeakerExperiment": "orthograd.asr_bench.experiment",
    "speaker_tables": "orthograd.asr_bench.tables",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

# the task ``orthograd bench`` runs from this package (``bench.experiments.benchmark_tasks``)
BENCHMARK_TASK = (
    "asr", "orthograd.asr_bench.config:SpeakerBenchConfig", "orthograd.asr_bench.experiment:SpeakerExperiment"
)
