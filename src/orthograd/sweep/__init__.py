"""Sweeps at scale: a benchmark config's grid as Ray Tune trials (``orthograd sweep``), or local processes."""

from orthograd.sweep.runner import BACKENDS, NO_RAY_NOTE, ray_available, run_sweep

__all__ = ["BACKENDS", "NO_RAY_NOTE", "ray_available", "run_sweep"]
