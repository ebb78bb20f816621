"""``orthograd sweep``: a benchmark config's runs (its ``sweep:`` grid, then the selected test runs) on Ray Tune.

The plan, the keys, the records and the selection are the bench's own (``bench.runner.Bench``): only where the jobs
run changes. With Ray (``pip install orthograd[ray]``) every job is a Ray Tune trial, on a local Ray cluster that the
command starts and stops, or on the cluster at ``address``. Without Ray the jobs run in local worker processes
(the bench's process pool), with a note saying so. Either way ``RUN_DIR/results.jsonl`` holds the same records as
``orthograd bench`` writes, so ``orthograd report RUN_DIR`` works, and rerunning the command resumes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from orthograd.bench.config import BenchConfig
from orthograd.bench.runner import Bench, Job, OnRun, OnStart
from orthograd.choices import check_choice, choices

if TYPE_CHECKING:  # ray is an optional extra: imported only when a sweep runs on it
    from orthograd.sweep.ray_trials import TrialResources

log = logging.getLogger(__name__)
Backend = Literal["auto", "ray", "local"]
BACKENDS: tuple[str, ...] = choices(Backend)
NO_RAY_NOTE = (
    "Ray is not installed (pip install 'orthograd[ray]'): the sweep runs in local worker processes instead of Ray Tune"
)


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.tune") is not None


class RayBench(Bench):
    """A ``Bench`` whose jobs run as Ray Tune trials.

    It connects to Ray only when a phase has unfinished jobs (a fully resumed sweep starts nothing): to the cluster
    at ``address``, or to a local cluster of ``num_cpus`` CPUs that ``close`` shuts down again.
    """

    def __init__(
        self,
        config: BenchConfig,
        raw: Mapping[str, Any],
        *,
        out_dir: str | Path,
        resources: TrialResources,
        address: str | None = None,
        num_cpus: int | None = None,
    ) -> None:
        super().__init__(config, raw, out_dir=out_dir)
        self.resources = resources
        self.address = address
        self.num_cpus = num_cpus
        self._started_ray = False

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.address is not None:
            ray.init(address=self.address, log_to_driver=False)
        else:
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False)
            self._started_ray = True

    def close(self) -> None:
        """Shut down the local Ray cluster this bench started (a cluster given by address is left running)."""
        import ray

        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def _run_jobs(self, phase: str, jobs: list[Job], on_start: OnStart | None, on_run: OnRun | None) -> None:
        from orthograd.sweep.ray_trials import run_trials

        done = {r.get("key") for r in self.log.records()}
        todo = [job for job in jobs if job.key not in done]
        if on_start is not None:
            on_start(phase, len(todo))
        if not todo:
            return
        self._connect()
        run_trials(
            self.raw, todo, name=phase, storage=self.out / "ray", resources=self.resources,
            on_record=lambda record: self._finish(record, on_run),
        )


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
        workers = num_cpus or os.cpu_count() or 1
        local = config.model_copy(update={"workers": workers, "threads_per_worker": max(1, int(cpus_per_trial))})
        return Bench(local, raw, out_dir=out_dir).run(on_start=on_start, on_run=on_run)
    from orthograd.sweep.ray_trials import TrialResources

    resources = TrialResources(cpus=cpus_per_trial, gpus=gpus_per_trial)
    bench = RayBench(config, raw, out_dir=out_dir, resources=resources, address=address, num_cpus=num_cpus)
    try:
        return bench.run(on_start=on_start, on_run=on_run)
    finally:
        bench.close()
