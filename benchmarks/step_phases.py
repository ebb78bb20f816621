"""Where an OrthoGrad step's CPU time goes, phase by phase, beside a NegGrad+ step on the same batches.

Wraps the ghost engine's and the method's phase functions with timers (the CPU time of this thread, exclusive of
nested phases) and runs ``step_cost.py``'s quick setups: the ghost pass's forward ("forward", what is left of the
pass), the backward to the layers' outputs and the forget gradient ("backward"), the per-layer pieces ("pieces"),
the forget rows' mean gradient from their pieces ("probe sum"), the Gram blocks and ``G g`` ("gram"), the k x k
solve ("solve"), ``G^T w`` ("combine"), the optimizer step ("optimizer") and the rest of the step; and the minor
page faults of each step (fresh pages of large temporaries: glibc returns freed memory above its trim threshold
to the system, and the next step faults it back in); and the leaf operators of one step (``torch.profiler``
events with no children, less the ones that only make views or allocate: about what a GPU would launch).
Medians over ``--steps`` interleaved steps after two warm-ups; run with one thread for figures that add up.

    OMP_NUM_THREADS=1 python benchmarks/step_phases.py --setups smallcnn_8_full resnet18_32_lora --steps 9
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

PHASES = ("forward", "backward", "pieces", "probe sum", "gram", "solve", "combine", "optimizer", "rest")


class PhaseClock:
    """Exclusive CPU time per phase: time spent in a nested phase is charged to it, not to its caller."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []  # [name, start, time charged to nested phases]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        entry: list[Any] = [name, time.thread_time(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            spent = time.thread_time() - entry[1]
            self.totals[name] += spent - entry[2]
            if self._stack:
                self._stack[-1][2] += spent

    def wrap(self, owner: Any, attribute: str, name: str, *, except_within: tuple[str, ...] = ()) -> None:
        """Replace ``owner.attribute`` by a timed call of it under phase ``name`` (left to the calling phase when
        that is one of ``except_within``: a helper shared by two phases)."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            caller = self._stack[-1][0] if self._stack else None
            with self.phase(caller if caller in except_within else name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)


def instrument(clock: PhaseClock) -> None:
    """Time the phases of the ghost engine and of OrthoGrad's step (the functions named by this version's code)."""
    from orthograd.grads import ghost
    from orthograd.methods.orthograd import direction

    clock.wrap(ghost, "_chunk_pieces", "forward")  # what the pass spends outside its backward and pieces
    clock.wrap(ghost, "layer_pieces", "pieces")
    clock.wrap(ghost, "_summed", "probe sum")
    clock.wrap(ghost, "_accumulate", "gram")
    clock.wrap(direction, "gram_coefficients", "solve")
    clock.wrap(ghost.GhostSpan, "combine", "combine")
    clock.wrap(torch.autograd, "grad", "backward")
    if hasattr(ghost, "_dense_combine"):  # joined sums of materialised pieces (versions that have them)
        clock.wrap(ghost, "_dense_combine", "probe sum", except_within=("combine",))


METADATA_OPS = frozenset(f"aten::{op}" for op in (
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "as_strided_", "slice", "select", "narrow",
    "split", "split_with_sizes", "unbind", "transpose", "t", "permute", "expand", "unsqueeze", "squeeze", "flatten",
    "unflatten", "unfold", "detach", "alias", "lift_fresh", "resolve_conj", "resolve_neg", "empty", "empty_like",
    "empty_strided", "resize_", "set_", "result_type", "_local_scalar_dense",
))


def leaf_operators(step: Callable[[], None]) -> int:
    """Operators of one step that do work (profiler events without children, less views and allocations)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not e.cpu_children
               and e.name not in METADATA_OPS)


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def profile(setup: Any, sc: Any, clock: PhaseClock, steps: int) -> tuple[dict[str, float], float, float]:
    """Median phase times, OrthoGrad step and NegGrad+ step, in ms of CPU time; among the phases also the steps'
    page faults (``faults``, ``neg faults``) and leaf operators (``ops``, ``neg ops``), times 1000."""
    runner = sc._Steps(setup, "ghost", device=torch.device("cpu"), bf16=False, chunk_size=None)
    clock.wrap(runner.orthograd.optimizer, "step", "optimizer")
    for _ in range(2):
        runner.orthograd_step()
        runner.neggrad_plus_step()
    per_step: dict[str, list[float]] = defaultdict(list)
    totals, neg = [], []
    for _ in range(steps):
        clock.totals.clear()
        start, faults = time.thread_time(), _faults()
        with clock.phase("rest"):
            runner.orthograd_step()
        totals.append(time.thread_time() - start)
        per_step["faults"].append(1e-3 * (_faults() - faults))
        for name in PHASES:
            per_step[name].append(clock.totals.get(name, 0.0))
        start, faults = time.thread_time(), _faults()
        runner.neggrad_plus_step()
        neg.append(time.thread_time() - start)
        per_step["neg faults"].append(1e-3 * (_faults() - faults))
    medians = {name: 1e3 * statistics.median(values) for name, values in per_step.items()}
    medians["ops"] = 1e3 * leaf_operators(runner.orthograd_step)
    medians["neg ops"] = 1e3 * leaf_operators(runner.neggrad_plus_step)
    return medians, 1e3 * statistics.median(totals), 1e3 * statistics.median(neg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quick = ["smallcnn_8_full", "smallcnn_8_lora", "resnet18_32_full", "resnet18_32_lora"]
    parser.add_argument("--setups", nargs="*", default=quick, help="step_cost.py quick setups")
    parser.add_argument("--steps", type=int, default=9)
    args = parser.parse_args(argv)
    import step_cost as sc  # a script's own folder is on sys.path
    clock = PhaseClock()
    instrument(clock)
    setups = {s.name: s for s in sc.quick_setups()}
    print(f"torch threads {torch.get_num_threads()}; CPU ms per step, median of {args.steps}")
    header = " | ".join(PHASES)
    print(f"| setup | OrthoGrad / NegGrad+ ms | ratio | {header} | page faults | leaf operators |")
    print("|---|---|---|" + "---|" * (len(PHASES) + 2))
    for name in args.setups:
        phases, total, neg = profile(setups[name], sc, clock, args.steps)
        cells = " | ".join(f"{phases.get(p, 0.0):.1f}" for p in PHASES)
        faults = f"{phases['faults']:.0f} / {phases['neg faults']:.0f}"
        ops = f"{phases['ops'] / 1e3:.0f} / {phases['neg ops'] / 1e3:.0f}"
        print(f"| {name} | {total:.1f} / {neg:.1f} | {total / neg:.2f}x | {cells} | {faults} | {ops} |", flush=True)


if __name__ == "__main__":
    main()
