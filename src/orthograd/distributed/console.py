"""The terminal side of ``orthograd unlearn-ddp`` (one process per device, started by torchrun)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist
from rich.console import Console

from orthograd.image_bench.config import load_config
from orthograd.bench.printer import RunPrinter
from orthograd.image_bench.experiment import run_line
from orthograd.distributed.bench import run_bench_distributed
from orthograd.distributed.runner import init_process_group_from_env


def ddp_command(
    path: Path, overrides: Sequence[str], out: Path | None, method_names: Sequence[str] | None, console: Console
) -> Path:
    """Join torchrun's process group, run the config's test runs data-parallel, print from rank 0 only."""
    config, raw = load_config(path, overrides=overrides)
    run_dir = out or Path("runs") / config.name
    device = init_process_group_from_env(device=config.device)
    printer = RunPrinter(console, line=run_line)
    try:
        if dist.get_rank() == 0:
            console.log(f"{dist.get_world_size()} ranks ({dist.get_backend()}), rank 0 on {device}; results: {run_dir}")
        run_bench_distributed(config, raw, out_dir=run_dir, device=device, method_names=method_names,
                              on_start=printer.started, on_run=printer.finished)
    finally:
        dist.destroy_process_group()
    return run_dir
