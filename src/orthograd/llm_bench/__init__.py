"""Offline TOFU-style benchmark for causal LMs: fictitious authors, a small Llama trained from scratch, TOFU's metrics.

    from orthograd.bench.experiments import run_experiment
    records = run_experiment("configs/authors_llm.yaml", overrides=["corpus.authors=20"])

``orthograd bench CONFIG.yaml`` (and ``run_experiment``) runs configs with ``task: causal_lm`` as
``experiment.AuthorsExperiment`` on the engine (``bench.engine``). Names load on first use, so importing
``orthograd.llm_bench.config`` does not load transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AuthorsBenchConfig": "config", "load_config": "config", "AuthorsExperiment": "experiment",
    "build_corpus": "workbench", "authors_tables": "tables", "record_line": "tables",
}
_MODULES = ("config", "experiment", "plots", "tables", "tuning", "workbench")
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# the task ``orthograd bench`` runs from this package (``bench.experiments.benchmark_tasks``)
BENCHMARK_TASK = (
    "causal_lm", "orthograd.llm_bench.config:AuthorsBenchConfig", "orthograd.llm_bench.experiment:AuthorsExperiment"
)
