"""Where the time of a whole ``orthograd bench`` run goes, and unlearning time as a fraction of retraining time.

Runs one benchmark config in this process (one split, no sweep, a fresh model cache so that the original model
and the retrained reference are trained and timed too) with timers around each phase:

- data: loading and splitting the dataset;
- original / retrain: training the original model and the retrain-from-scratch reference;
- unlearning, split into optimizer steps (the method's own work), evaluation rows (every set after every epoch,
  the paper's schedule, or the forget set with ``track="stop"`` and the rest once at the end), stop-rule probes
  (mid-epoch checks of the forget set) and set-up/merge (input checks, evaluating the original model for the
  first row, copying the model, attaching and merging LoRA);
- privacy: the membership-inference attacks on the unlearned and the original model;
- rest: reporting and bookkeeping.

Then, per method: unlearning wall time, its share of steps / evaluation / probes, and unlearn time / retrain time
(the reciprocal of the bench's ``efficiency``).

    OMP_NUM_THREADS=1 python benchmarks/bench_profile.py configs/fashion_mnist_random.yaml
    OMP_NUM_THREADS=1 python benchmarks/bench_profile.py configs/demo.yaml --set scenario.kind=class
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

import orthograd.privacy
from orthograd import api
from orthograd.bench.experiments import run_experiment
from orthograd.image_bench import experiment as runner
from orthograd.image_bench import references as training
from orthograd.image_bench.config import load_config

PHASES = ("data", "original", "retrain", "steps", "evaluation", "probes", "setup/merge", "privacy", "rest")


class PhaseTimer:
    """Wall time per phase; nested phases are subtracted from the phase that encloses them."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.per_method: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.method: str | None = None
        self._stack: list[list[float]] = []  # [start, time spent in nested phases]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._stack.append([time.perf_counter(), 0.0])
        try:
            yield
        finally:
            start, nested = self._stack.pop()
            spent = time.perf_counter() - start
            self.totals[name] += spent - nested
            if self.method is not None:
                self.per_method[self.method][name] += spent - nested
            if self._stack:
                self._stack[-1][1] += spent

    def wrap(self, owner: Any, attribute: str, name: str) -> Callable[[], None]:
        """Time every call of ``owner.attribute`` as phase ``name``; returns the function that undoes it."""
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)
        return lambda: setattr(owner, attribute, original)


def profile(config_path: str, overrides: list[str]) -> tuple[PhaseTimer, list[dict[str, Any]], float]:
    """Run the config (first split, no sweep, one process, fresh cache) under the phase timer."""
    timer = PhaseTimer()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as undo:
        config, raw = load_config(config_path, overrides=[
            "tuning.search=false", "workers=1", f"cache_dir={Path(tmp) / 'cache'}", *overrides,
        ])
        for owner, attribute, name in (
            (runner, "load_bench_data", "data"),
            (training.ModelCache, "original", "original"),
            (training.ModelCache, "retrained", "retrain"),
            (api._Run, "loop", "steps"),  # what the nested phases below leave is the optimizer steps
            (api._Run, "evaluate", "evaluation"),
            (api._Run, "complete_last_row", "evaluation"),  # track="stop": the last row's other sets
            (api._Run, "probe", "probes"),
            (orthograd.privacy, "privacy_metrics", "privacy"),
            (runner, "privacy_metrics", "privacy"),  # the name the runner imported
        ):
            undo.callback(timer.wrap(owner, attribute, name))
        unlearn = runner.bench_unlearn

        def timed_unlearn(*args: Any, method: str, **kwargs: Any) -> Any:
            timer.method = method
            with timer.phase("setup/merge"):
                return unlearn(*args, method=method, **kwargs)

        runner.bench_unlearn = timed_unlearn
        undo.callback(lambda: setattr(runner, "bench_unlearn", unlearn))
        started = time.perf_counter()
        with timer.phase("rest"):
            records = [r for r in run_experiment(config, raw=raw, out_dir=Path(tmp) / "run") if r["phase"] == "test"]
        return timer, records, time.perf_counter() - started


def report(timer: PhaseTimer, records: list[dict[str, Any]], total: float, config_path: str) -> str:
    lines = [
        f"config {config_path}, first split; {platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}; whole run {total:.1f} s",
        "",
        "| phase | seconds | share |",
        "|---|---|---|",
        *(f"| {p} | {timer.totals[p]:.1f} | {timer.totals[p] / total:.1%} |" for p in PHASES),
        "",
        "| method | unlearn (s) | steps | evaluation | probes | set-up/merge | stop | unlearn / retrain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    retrain = timer.totals["retrain"]
    for record in records:
        parts = timer.per_method[record["method"]]
        spent = sum(parts[p] for p in ("steps", "evaluation", "probes", "setup/merge"))
        shares = " | ".join(f"{parts[p] / spent:.0%}" for p in ("steps", "evaluation", "probes", "setup/merge"))
        fraction = f"{spent / retrain:.2f}" if retrain > 0 else "–"
        lines.append(f"| {record['method']} | {spent:.1f} | {shares} | {record['stop_reason']} | {fraction} |")
    lines.append(f"\nretrain from scratch (one split): {retrain:.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    kind = load_config(args.config, overrides=args.overrides)[0].scenario.kind
    first_split = "protocol.seeds=[0]" if kind == "random" else "scenario.classes=[1]"
    overrides = [first_split, "scenario.retrain=true", *args.overrides]
    timer, records, total = profile(args.config, overrides)
    print(report(timer, records, total, args.config))


if __name__ == "__main__":
    main()
