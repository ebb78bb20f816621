"""``orthograd demo``: the shipped ``demo`` config (``configs/demo.yaml``) run by the experiment engine.

Random and class forgetting on real digits with every registered method, in one run folder and one table; the
config says what the protocol is and why. ``method_names`` keeps only some of its methods (``--method``).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orthograd import methods
from orthograd.bench.config import expand_config
from orthograd.bench.image_config import validate_config
from orthograd.bench.console import shipped_configs
from orthograd.bench.engine import OnRun, OnStart
from orthograd.bench.image import run_bench

TITLE = "Digits, SmallCNN: mean ± std over 3 seeds (random) / 3 classes (class)"


def check_methods(names: Sequence[str]) -> None:
    """Refuse unknown method names, suggesting the closest registered one."""
    available = methods.available()
    for name in names:
        if name not in available:
            close = difflib.get_close_matches(name, available, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown method {name!r}: {hint}available: {', '.join(available)}")


def run_demo(
    *,
    out_dir: str | Path = "runs/demo",
    method_names: Sequence[str] | None = None,
    on_start: OnStart | None = None,
    on_run: OnRun | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the demo into ``out_dir``: ``results.jsonl``, the report (``table.md``, ``report.md``) and
    the plots (``trajectories.png``, ``tradeoff.png``); returns the records of both scenarios."""
    variants, raw = expand_config(shipped_configs()["demo"])
    if method_names is not None:
        check_methods(method_names)
        keep = set(method_names)
        variants = {name: {**v, "methods": {m: h for m, h in v["methods"].items() if m in keep}}
                    for name, v in variants.items()}
    configs = [validate_config(variant) for variant in variants.values()]
    return run_bench(configs, raw, out_dir=out_dir, on_start=on_start, on_run=on_run)
