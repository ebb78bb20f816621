"""Speaker unlearning benchmark for Whisper (paper Section 5.3, Tables 1 and 2), offline (espeak) or LibriSpeech.

    from orthograd import asr_bench
    records = asr_bench.run_config_file("configs/espeak_speaker_smoke.yaml", ["speakers.count=1"])

``orthograd bench CONFIG.yaml`` dispatches configs with ``task: asr`` to ``run_config_file``.
"""

from orthograd.asr_bench.config import SpeakerBenchConfig, load_config
from orthograd.asr_bench.runner import finetune, run, run_config_file
from orthograd.asr_bench.tables import speaker_tables

__all__ = ["SpeakerBenchConfig", "finetune", "load_config", "run", "run_config_file", "speaker_tables"]
