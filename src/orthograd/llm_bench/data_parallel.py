"""The TOFU-style benchmark on torchrun's ranks (``orthograd bench CONFIG --backend ddp``).

Rank 0 trains and stores the base, original and retrained models first (the engine's ``prepare``); the other
ranks load them. Every rank then plans the same phases and runs each job together: an unlearning run is
``unlearn_distributed`` over the ranks (each rank holds its share of every forget and retain batch; OrthoGrad's
update is the single-process one of the global batches; the stop rule is evaluated on rank 0 and its verdict
shared), and the measurements (TOFU's metrics, the attacks, relearning) run whole on every rank, on the rank's own
device. The engine logs rank 0's records; a run's record carries ``world_size``.
"""

from __future__ import annotations

import torch

from orthograd.bench.data_parallel import on_rank_device, unlearn_on_ranks, with_world_size
from orthograd.bench.records import Record
from orthograd.llm_bench.config import AuthorsBenchConfig
from orthograd.llm_bench.experiment import AuthorsExperiment, AuthorsJob


class DataParallelAuthors(AuthorsExperiment):
    """``AuthorsExperiment`` whose runs are one data-parallel run over the process group, this rank on ``device``."""

    def __init__(self, config: AuthorsBenchConfig, *, device: torch.device) -> None:
        super().__init__(on_rank_device(config, device), unlearn=unlearn_on_ranks)

    def run_job(self, job: AuthorsJob) -> Record:
        return with_world_size(super().run_job(job))
