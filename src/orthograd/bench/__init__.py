"""Benchmarks from YAML configs: data, original model (cached), retrained reference, methods x splits, results.

``orthograd bench CONFIG.yaml`` runs one; ``orthograd report RUN_DIR`` turns its results into tables and plots.
"""

from orthograd.bench.config import BenchConfig, ConfigError, apply_overrides, load_config, validate_config
from orthograd.bench.runner import Bench, run_bench

__all__ = ["Bench", "BenchConfig", "ConfigError", "apply_overrides", "load_config", "run_bench", "validate_config"]
