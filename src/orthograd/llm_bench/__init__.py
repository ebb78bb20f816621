"""Offline TOFU-style benchmark for causal LMs: fictitious authors, a small Llama trained from scratch, TOFU's metrics.

    from orthograd import llm_bench
    records = llm_bench.run_config_file("configs/authors_llm.yaml", ["corpus.authors=20"])

``orthograd bench CONFIG.yaml`` dispatches configs with ``task: causal_lm`` to ``run_config_file``.
"""

from orthograd.llm_bench.config import AuthorsBenchConfig, load_config
from orthograd.llm_bench.runner import build_corpus, run, run_config_file
from orthograd.llm_bench.tables import authors_tables, record_line

__all__ = ["AuthorsBenchConfig", "authors_tables", "build_corpus", "load_config", "record_line", "run",
           "run_config_file"]
