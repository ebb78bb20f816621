"""``orthograd demo``: the shipped ``demo`` config (``configs/demo.yaml``) run by the experiment engine.

Random and class forgetting on real digits with every registered method, in one run folder and one table; the
config says what the protocol is and why. ``method_names`` keeps only some of its methods (``--method``, any case).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orthograd.bench.console import shipped_configs
from orthograd.bench.engine import OnRun, OnStart
from orthograd.bench.experiments import load_experiment
from orthograd.image_bench.experiment import run_bench
from orthograd.image_bench.config import BenchConfig

TITLE = "Digits, SmallCNN: mean ± 95% CI over 5 seeds (random) / 5 classes (class)"


def run_demo(
    *,
    out_dir: str | Path = "runs/demo",
    method_names: Sequence[str] | None = None,
    on_start: OnStart | None = None,
    on_run: OnRun | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the demo into ``out_dir``: ``results.jsonl``, the report (``table.md``, ``report.md``), the
    plots (``trajectories.png``, ``tradeoff.png``) and the trained models (``cache/``); returns the records of both
    scenarios."""
    configs, raw = load_experiment(shipped_configs()["demo"], overrides=[f"output={json.dumps(str(out_dir))}"],
                                   methods_kept=method_names)
    return run_bench([c for c in configs if isinstance(c, BenchConfig)], raw, out_dir=out_dir, on_start=on_start,
                     on_run=on_run)
