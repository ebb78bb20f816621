"""The benchmark protocol every task's engine applies to every method: one stop-rule cadence, one tuning budget.

Cadence: a benchmark checks every iterative method's stop rule equally often. Either every ``eval_every`` optimizer
steps, or (the default) ``checks_per_epoch`` times per pass over the forget set: every ``ceil(forget size / the
method's forget batch size) // checks_per_epoch`` steps (at least 1), plus the check after every epoch that every
run has. This is the cadence OrthoGrad's adaptive schedule asks for itself (4 an epoch), now given to every method;
a method whose epoch also walks the retain set (SCRUB, Finetune) is checked at least as often. One-shot methods have
no loop to check.

Tuning budget: every tuned method gets the same number of validation trials over its own knobs (lr plus its main
one), by one rule (``trials``): its grid as listed, padded with seeded random points inside the grid's ranges up to
the size of the config's largest grid (log-uniform between the ends of a float knob, one of the listed values of
any other knob), so a method listed with fewer points is never searched less (a grid without a float knob cannot
grow beyond its own points: it is searched whole, and marked short of the budget). When the
chosen point lies at the low or high end of a numeric knob that lists at least 3 values, the knob's values shift one
step past that end (the ratio of the two end values, or their difference when one is <= 0) and the shifted grid is
searched once more (``extend_edges``); the points both grids share are not rerun. A value the method refuses (an
alpha above 1) is not tried: that end is the method's bound.

A missed target is data: ``bench_unlearn`` keeps it in the result (the record, the run's console line and the
table's mark say it) instead of the warning ``unlearn`` gives a caller on its own.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from orthograd import methods
from orthograd.api import unlearn
from orthograd.bench.config import ProtocolConfig, content_hash, grid_points
from orthograd.results import UnlearnResult

T = TypeVar("T")
MIN_VALUES_TO_EXTEND = 3  # with fewer values a knob has no interior: every choice would be "on the edge"


def eval_every_for(
    method: str, hyperparameters: Mapping[str, Any], *, forget_size: int, eval_every: int | None,
    checks_per_epoch: int,
) -> int | None:
    """Steps between the stop rule's checks for one run of ``method`` (None: a one-shot method, no loop)."""
    if methods.get(method).one_shot:
        return None
    if eval_every is not None:
        return eval_every
    batch_size = getattr(methods.make_config(method, dict(hyperparameters)), "forget_batch_size", None) or 1
    return max(1, math.ceil(forget_size / batch_size) // checks_per_epoch)


def run_schedule(
    protocol: ProtocolConfig, *, method: str, hyperparameters: Mapping[str, Any], forget_size: int, has_rule: bool,
) -> dict[str, int | None]:
    """The budget and the stop rule's cadence of one run under ``protocol`` (``max_epochs``, ``max_steps``,
    ``eval_every`` as ``unlearn`` takes them): every task's runs get theirs here. Without a stop rule there is
    nothing to check: ``protocol.eval_every`` as given (None: ``unlearn`` chooses, as for any user: an epoch's row,
    and four rows an epoch for OrthoGrad's adaptive schedule, which steers on them)."""
    eval_every = eval_every_for(method, hyperparameters, forget_size=forget_size, eval_every=protocol.eval_every,
                                checks_per_epoch=protocol.checks_per_epoch) if has_rule else protocol.eval_every
    return {"max_epochs": protocol.max_epochs, "max_steps": protocol.max_steps, "eval_every": eval_every}


def grid_size(grid: Mapping[str, Sequence[Any]]) -> int:
    return math.prod(len(values) for values in grid.values())


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _beyond(values: list[Any], *, high: bool) -> Any:
    """The next value past the high (or low) end of sorted ``values``, continuing their spacing."""
    near, end = (values[-2], values[-1]) if high else (values[1], values[0])
    if near > 0 and end > 0:
        step = end * (end / near)
    else:
        step = end + (end - near)
    return round(step) if all(isinstance(v, int) for v in values) else float(f"{step:.6g}")


def extend_edges(
    grid: Mapping[str, Sequence[Any]], chosen: Mapping[str, Any], *, valid: Callable[[dict[str, Any]], bool],
) -> tuple[dict[str, list[Any]], dict[str, dict[str, Any]]]:
    """The grid shifted one step past each end ``chosen`` sits on, and per shifted knob what changed
    (``{"end": "low" | "high", "values": [...]}``); an unchanged grid and ``{}`` when no knob is on an end."""
    out = {name: list(values) for name, values in grid.items()}
    changes: dict[str, dict[str, Any]] = {}
    for name, values in grid.items():
        if len(set(values)) < MIN_VALUES_TO_EXTEND or not _numeric(values) or name not in chosen:
            continue
        ordered = sorted(set(values))
        if chosen[name] not in (ordered[0], ordered[-1]):
            continue
        high = chosen[name] == ordered[-1]
        new = _beyond(ordered, high=high)
        if new in ordered or not valid({**chosen, name: new}):
            changes[name] = {"end": "high" if high else "low", "values": list(values), "extended": False,
                             "why": f"{new} is outside what the method accepts"}
            continue
        shifted = [*ordered[1:], new] if high else [new, *ordered[:-1]]
        out[name] = shifted
        changes[name] = {"end": "high" if high else "low", "values": list(values), "extended": True,
                         "to": shifted}
    return out, changes


def method_accepts(method: str, base: Mapping[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """Whether ``method``'s config accepts a point over ``base`` (the test ``extend_edges`` applies)."""

    def accepts(point: dict[str, Any]) -> bool:
        try:
            methods.make_config(method, {**base, **point})
        except (ValueError, TypeError):
            return False
        return True

    return accepts


def _padding_value(values: Sequence[Any], rng: random.Random) -> Any:
    """A random value for a knob: log-uniform between the ends of listed positive floats (uniform when one is <= 0),
    one of the listed values for anything else (batch sizes, step counts, names)."""
    floats = _numeric(values) and any(isinstance(v, float) for v in values) and len(set(values)) > 1
    if not floats:
        return rng.choice(list(values))
    low, high = float(min(values)), float(max(values))
    value = math.exp(rng.uniform(math.log(low), math.log(high))) if low > 0 else rng.uniform(low, high)
    return float(f"{value:.3g}")


class Search:
    """One gridded row's validation search, the same for every task: its grid's trials padded to ``size``
    (``trials``, seeded by the row's ``label``); once they are scored, when ``extend`` and the best point lies on
    an end of a knob (``extend_edges``), the shifted grid's trials once more (the points both grids share are the
    same jobs, not rerun); the choice by ``select`` over every trial, in the order tried."""

    def __init__(self, label: str, grid: Mapping[str, Sequence[Any]], *, size: int, extend: bool,
                 accepts: Callable[[dict[str, Any]], bool]) -> None:
        self.label = label
        self.grid = {name: list(values) for name, values in grid.items()}
        self.size = size
        self.extend = extend
        self.accepts = accepts
        self.rounds: list[list[dict[str, Any]]] = [trials(grid, size=size, seed=label)]
        self.edges: dict[str, dict[str, Any]] = {}  # per knob on an end: what changed (``extend_edges``)

    def tried(self) -> list[tuple[int, dict[str, Any]]]:
        """Every point so far with the round (1 or 2) it was first tried in."""
        out: dict[str, tuple[int, dict[str, Any]]] = {}
        for index, points in enumerate(self.rounds, start=1):
            for point in points:
                out.setdefault(content_hash(point), (index, point))
        return list(out.values())

    def extension(self, best: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The second round's points when ``best`` (the choice after the first) lies on an end of a knob; none
        otherwise, or when the search does not extend."""
        if not self.extend or len(self.rounds) > 1:
            return []
        shifted, self.edges = extend_edges(self.grid, best, valid=self.accepts)
        if not any(change["extended"] for change in self.edges.values()):
            return []
        self.rounds.append(trials(shifted, size=self.size, seed=f"{self.label} extended"))
        return self.rounds[1]

    def summary(self, best: Mapping[str, Any]) -> dict[str, Any]:
        """What ``selection.json`` says of the search: short of the budget, the edges, whether the second round
        ran, and the knobs the final choice still lies on an end of."""
        extended = {k: v for k, v in self.edges.items() if v["extended"]}
        final_grid = {name: sorted({*values, *extended.get(name, {}).get("to", [])})
                      for name, values in self.grid.items()}
        _, still = extend_edges(final_grid, best, valid=lambda point: True)
        return {"short_of_budget": len(self.rounds[0]) < self.size, "edges": self.edges,
                "edge_extended": bool(extended), "still_on_edge": sorted(still)}


def select(scored: Sequence[T], *, score: Callable[[T], Any]) -> T:
    """The selection rule of every task: the trial with the lowest ``score`` (the task's: image mean validation
    UIS; speech mean W_val among the variants that reach the target; language models forget quality among the
    points that keep utility), ties to the first trial in the order they were tried."""
    if not scored:
        raise ValueError("no trial to select from")
    return min(scored, key=score)


def trials(grid: Mapping[str, Sequence[Any]], *, size: int, seed: str) -> list[dict[str, Any]]:
    """The grid's points, padded to ``size`` with distinct seeded random points inside its ranges (``seed``: a
    string, e.g. the method's name, so every method's padding is its own and the same on every rerun). A grid with
    no float knob has no points beyond its own: it gives all of them (``selection.json`` then says it is short)."""
    points = grid_points(grid)
    rng = random.Random(content_hash(seed))
    seen = {content_hash(p) for p in points}
    for _ in range(100 * size):
        if len(points) >= size:
            break
        point = {name: _padding_value(values, rng) for name, values in grid.items()}
        if content_hash(point) not in seen:
            seen.add(content_hash(point))
            points.append(point)
    return points  # fewer than ``size`` only when the grid has no float knob and fewer points than that


UnlearnRun = Callable[..., UnlearnResult]  # ``orthograd.unlearn``'s signature (or ``unlearn_distributed``'s)


def bench_unlearn(*args: Any, **kwargs: Any) -> UnlearnResult:
    """``orthograd.unlearn`` as a benchmark runs it: every warning but the missed target's passes through."""
    return as_benchmark_run(unlearn, *args, **kwargs)


def as_benchmark_run(run: UnlearnRun, *args: Any, **kwargs: Any) -> UnlearnResult:
    """``run(*args, **kwargs)`` (``unlearn`` or ``unlearn_distributed``) with the missed target's warning kept in
    the result only; every other warning passes through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(*args, **kwargs)
    for warning in caught:
        if str(warning.message) != result.missed_target:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return result
