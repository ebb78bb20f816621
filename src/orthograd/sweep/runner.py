"""``orthograd sweep`` (= ``orthograd bench --backend ray``): a config's runs as Ray Tune trials.

Only where the jobs run changes: the plan, the keys, the records and the selection are the experiment's own
(``bench.engine.Engine``). With Ray (``pip install orthograd[ray]``) every job is a Ray Tune trial
(``sweep.ray_trials.RayTune``), on a local Ray cluster that the command starts and stops, or on the cluster at
``address``. Without Ray the jobs run in local worker processes (``bench.executors.ProcessPool``), with a note saying
so. Either way ``RUN_DIR/results.jsonl`` holds the same records as ``orthograd bench`` writes, so a rerun resumes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from orthograd.image_bench.config import BenchConfig
from orthograd.bench.engine import OnRun, OnStart
from orthograd.bench.executors import Executor, ProcessPool
from orthograd.image_bench.experiment import run_bench
from orthograd.choices import check_choice, choices

log = logging.getLogger(__name__)
Backend = Literal["auto", "ray", "local"]
BACKENDS: tuple[str, ...] = choices(Backend)
NO_RAY_NOTE = (
    "Ray is not installed (pip install 'orthograd[ray]'): the sweep runs in local worker processes instead of Ray Tune"
)


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.tune") is not None


@contextmanager
def trial_executor(
    *,
    out_dir: str | Path,
    backend: Backend = "auto",
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    on_note: Callable[[str], None] = log.warning,
) -> Iterator[Executor]:
    """Ray Tune trials for any experiment's jobs (closed on exit), or local worker processes without Ray.

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
        yield ProcessPool(workers=num_cpus or os.cpu_count() or 1, threads=max(1, int(cpus_per_trial)))
        return
    from orthograd.sweep.ray_trials import RayTune, TrialResources  # ray is an optional extra

    resources = TrialResources(cpus=cpus_per_trial, gpus=gpus_per_trial)
    trials = RayTune(storage=Path(out_dir) / "ray", resources=resources, address=address, num_cpus=num_cpus)
    try:
        yield trials
    finally:
        trials.close()


def run_sweep(
    config: BenchConfig,
    raw: Mapping[str, Any],
    *,
    out_dir: str | Path,
    on_start: OnStart | None = None,
    on_run: OnRun | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Run (or resume) an image config's sweep and test runs on ``trial_executor(**options)``; returns the
    test-phase records."""
    with trial_executor(out_dir=out_dir, **options) as executor:
        return run_bench(config, raw, out_dir=out_dir, executor=executor, on_start=on_start, on_run=on_run)
