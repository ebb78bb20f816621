"""A benchmark config's test runs as data-parallel runs: ``torchrun ... orthograd unlearn-ddp CONFIG.yaml``.

Every rank loads the config and the data; rank 0 trains (or loads) the cached original model first and the other
ranks load it from the cache after a barrier. Each run (method x split x retain size, with the config's
hyperparameters) is ``unlearn_distributed``; rank 0 appends its record to ``RUN_DIR/results.jsonl`` under the same
key ``orthograd bench`` uses, so ``orthograd report RUN_DIR`` works and a rerun skips finished runs. Not done here
(single-process ``orthograd bench`` does them): the sweep phase (use ``orthograd sweep``), the retrained reference
and the privacy metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orthograd.bench.config import BenchConfig
from orthograd.bench.data import load_bench_data
from orthograd.bench.runner import RESULTS_FILE, job_key, make_split, n_splits, split_seed
from orthograd.bench.training import ModelCache
from orthograd.distributed.collectives import world
from orthograd.distributed.runner import unlearn_distributed
from orthograd.io import ResultsLog
from orthograd.reporting import run_record


def run_bench_distributed(
    config: BenchConfig,
    *,
    out_dir: str | Path,
    device: torch.device,
    method_names: Sequence[str] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the config's test runs on every rank of the initialised process group; returns the records.

    Call on every rank with the same config; ``device`` is this rank's (``init_process_group_from_env``).
    ``method_names`` restricts the run to some of the config's methods. ``on_run`` is called on rank 0 only.
    """
    rank, size = world()
    unknown = sorted(set(method_names or ()) - set(config.methods))
    if unknown:
        raise ValueError(f"methods {unknown} are not in the config's methods {sorted(config.methods)}")
    chosen = {m: h for m, h in config.methods.items() if method_names is None or m in method_names}
    data = load_bench_data(config.data)
    if rank == 0:
        ModelCache(config, data, device=device).original()  # trains and caches once
    dist.barrier()
    original = ModelCache(config, data, device=device).original().model
    log = ResultsLog(Path(out_dir) / RESULTS_FILE)
    done = {r.get("key") for r in log.records()}
    dist.barrier()  # every rank has read the log before rank 0 appends to it
    records = []
    for retain_size in config.scenario.retain_size:
        for index in range(n_splits(config)):
            split = make_split(config, data.train_labels, split_index=index, retain_size=retain_size)
            forget, retain = split.datasets(data.train)
            seed = split_seed(config, index)
            for method, hyper in chosen.items():
                key = job_key(config, phase="test", method=method, hyperparameters=hyper, split_index=index,
                              retain_size=retain_size)
                if key in done:
                    continue
                result = unlearn_distributed(
                    original, forget, retain, method=method, test=data.test,
                    stop=config.scenario.kind if config.unlearn.stop else None,
                    max_epochs=config.unlearn.max_epochs, eval_every=config.unlearn.eval_every, device=device,
                    seed=seed, num_classes=data.num_classes, forget_classes=split.forget_classes, **hyper,
                )
                record = run_record(
                    result, scenario=config.scenario.kind, seed=seed,
                    forget_class=split.forget_classes[0] if split.forget_classes else None,
                    key=key, phase="test", evaluated_on="test", bench=config.name, hyperparameters=hyper,
                    retain_size=retain_size, forget_size=len(split.forget), original_hash=config.original_hash(),
                    device=str(device), world_size=size,
                )
                records.append(record)
                if rank == 0:
                    log.append(record)
                    if on_run is not None:
                        on_run(record)
    return records
