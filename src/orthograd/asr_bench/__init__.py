"""Speaker unlearning benchmark for Whisper (paper Section 5.3, Tables 1 and 2), offline (espeak) or LibriSpeech.

    from orthograd import asr_bench
    records = asr_bench.run_config_file("configs/espeak_speaker_smoke.yaml", ["speakers.count=1"])

``orthograd bench CONFIG.yaml`` runs configs with ``task: asr`` as ``experiment.SpeakerExperiment`` on the engine
(``bench.engine``), as ``run_config_file`` does. The names load on first use, so ``orthograd.asr_bench.config``
imports without the speech stack (transformers).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SpeakerBenchConfig": "orthograd.asr_bench.config",
    "load_config": "orthograd.asr_bench.config",
    "SpeakerExperiment": "orthograd.asr_bench.experiment",
    "run": "orthograd.asr_bench.experiment",
    "run_config_file": "orthograd.asr_bench.experiment",
    "speaker_tables": "orthograd.asr_bench.tables",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
