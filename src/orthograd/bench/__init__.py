"""The experiment engine and the image-classification benchmark: YAML configs, jobs, executors, results, reports.

``orthograd bench CONFIG.yaml`` runs any task's config (``bench.experiments``); ``orthograd report RUN_DIR`` turns
an image run's results into tables and plots.
"""

from orthograd.bench.config import ConfigError, apply_overrides

from orthograd.bench.image_config import BenchConfig, load_config, validate_config
from orthograd.bench.engine import Engine
from orthograd.bench.image import ImageExperiment, run_bench

__all__ = ["BenchConfig", "ConfigError", "Engine", "ImageExperiment", "apply_overrides", "load_config", "run_bench",
           "validate_config"]
