"""The speaker benchmark on torchrun's ranks (``orthograd bench CONFIG --backend ddp``).

Every rank plans the same jobs (validation runs included) and runs each one together: the unlearning run is
``unlearn_distributed`` over the ranks (each rank holds its share of every forget and retain batch; OrthoGrad's
update is the single-process one of the global batches), and the WERs before and after are measured whole on every
rank, on the rank's own device. The engine logs rank 0's records, which carry ``world_size``.
"""

from __future__ import annotations

import torch

from orthograd.asr_bench.config import SpeakerBenchConfig
from orthograd.asr_bench.experiment import Record, SpeakerExperiment, SpeakerJob
from orthograd.bench.data_parallel import on_rank_device, unlearn_on_ranks, with_world_size


class DataParallelSpeakers(SpeakerExperiment):
    """``SpeakerExperiment`` whose runs are one data-parallel run over the process group, this rank on ``device``."""

    def __init__(self, config: SpeakerBenchConfig, *, device: torch.device) -> None:
        super().__init__(on_rank_device(config, device), unlearn=unlearn_on_ranks)

    def run_job(self, job: SpeakerJob) -> Record:
        return with_world_size(super().run_job(job))
