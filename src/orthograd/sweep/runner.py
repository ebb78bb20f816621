"""``orthograd sweep``: a benchmark config's runs (its ``sweep:`` grid, then the selected test runs) on Ray Tune.

A thin wrapper that picks the bench's backend: the plan, the keys, the records and the selection are the bench's own
(``bench.runner.Bench``), only where the jobs run changes. With Ray (``pip install orthograd[ray]``) every job is a
Ray Tune trial (``sweep.ray_trials.RayTune``), on a local Ray cluster that the command starts and stops, or on the
cluster at ``address``. Without Ray the jobs run in local worker processes (``bench.executors.ProcessPool``), with
a note saying so. Either way ``RUN_DIR/results.jsonl`` holds the same records as ``orthograd bench`` writes, so
``orthograd report RUN_DIR`` works, and rerunning the command resumes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from orthograd.bench.config import BenchConfig
from orthograd.bench.executors import ProcessPool
from orthograd.bench.runner import Bench, OnRun, OnStart
from orthograd.choices import check_choice, choices

log = logging.getLogger(__name__)
Backend = Literal["auto", "ray", "local"]
BACKENDS: tuple[str, ...] = choices(Backend)
NO_RAY_NOTE = (
    "Ray is not installed (pip install 'orthograd[ray]'): the sweep runs in local worker processes instead of Ray Tune"
)


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.tune") is not None


def run_sweep(
    config: BenchConfig,
    raw: Mapping[str, Any],
    *,
    out_dir: str | Path,
    backend: Backend = "auto",
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    on_note: Callable[[str], None] = log.warning,
    on_start: OnStart | None = None,
    on_run: OnRun | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the config's sweep and test runs; returns the test-phase records.

    ``backend="auto"`` uses Ray when installed, else local worker processes (``num_cpus`` of them, default: the
    machine's cores) after calling ``on_note``. With Ray, ``address`` (e.g. ``ray://head:10001`` or ``auto``)
    joins an existing cluster; without it a local cluster with ``num_cpus`` CPUs is started and shut down here.
    Each trial reserves ``cpus_per_trial`` CPUs and ``gpus_per_trial`` GPUs.
    """
    check_choice("backend", backend, Backend)
    use_ray = backend == "ray" or (backend == "auto" and ray_available())
    if backend == "ray" and not ray_available():
        raise RuntimeError("backend='ray' needs Ray: pip install 'orthograd[ray]' (or use backend='local')")
    if not use_ray:
        if address is not None:
            raise ValueError(f"address={address!r} needs Ray: pip install 'orthograd[ray]'")
        if backend == "auto":
            on_note(NO_RAY_NOTE)
        pool = ProcessPool(workers=num_cpus or os.cpu_count() or 1, threads=max(1, int(cpus_per_trial)))
        return Bench(config, raw, out_dir=out_dir, executor=pool).run(on_start=on_start, on_run=on_run)
    from orthograd.sweep.ray_trials import RayTune, TrialResources  # ray is an optional extra

    resources = TrialResources(cpus=cpus_per_trial, gpus=gpus_per_trial)
    trials = RayTune(storage=Path(out_dir) / "ray", resources=resources, address=address, num_cpus=num_cpus)
    try:
        return Bench(config, raw, out_dir=out_dir, executor=trials).run(on_start=on_start, on_run=on_run)
    finally:
        trials.close()
