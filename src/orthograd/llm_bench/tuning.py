"""Hyperparameters chosen on a validation split, as the image benchmarks do: never on the authors that are tested.

For each forget fraction, as many validation forget authors are drawn (with their own seed) from the authors
outside every test forget set (a run's best values depend on how much it forgets); each run's ``grid`` is tried
once (the first seed) on that split against its own retrained reference, and the point kept
is the one with the best forget quality among those that keep model utility within ``keep_utility`` of the
original model's, first among the runs that reached the stop target undamaged (the most useful point when none
keeps that utility).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from orthograd.bench.protocol import select
from orthograd.data.authors import forget_authors
from orthograd.llm_bench.config import AuthorsBenchConfig


def validation_authors(config: AuthorsBenchConfig, *, fraction: float) -> list[int]:
    """The validation forget authors: ``fraction`` of the authors, none of them in a test forget set."""
    count, scenario = config.corpus.authors, config.scenario
    tested = {a for f in scenario.forget_fractions for a in forget_authors(count, fraction=f, seed=scenario.split_seed)}
    pool = [a for a in range(count) if a not in tested]
    wanted = max(1, round(fraction * count))
    if len(pool) < wanted:
        raise ValueError(f"only {len(pool)} authors are outside the test forget sets, tuning needs {wanted}")
    return sorted(random.Random(config.tuning.seed).sample(pool, wanted))


def choose(
    scored: Sequence[tuple[dict[str, Any], Mapping[str, Any]]], *, original_utility: float, keep_utility: float
) -> dict[str, Any]:
    """The point with the highest forget quality among those with model utility >= ``keep_utility`` x the
    original's (ties: the more useful), first among the runs that reached the stop target undamaged, then among
    the others; when none keeps that much utility, the most useful point.

    Reaching the target comes first because forget quality (a KS test on a small forget set) often ties: the ties
    would go to the most useful point, the one that changed the model least, which on the test seeds then misses
    the target the other methods reach."""
    floor = keep_utility * original_utility

    def score(trial: tuple[dict[str, Any], Mapping[str, Any]]) -> tuple[float, ...]:
        metrics = trial[1]
        if metrics["model_utility"] >= floor:
            return (0 if reached_undamaged(metrics) else 1, -metrics["forget_quality"], -metrics["model_utility"])
        return (2, -metrics["model_utility"])

    return select(scored, score=score)[0]


def reached_undamaged(record: Mapping[str, Any]) -> bool:
    """Whether a run's record says it reached its stop target (or had none) with the retain set within the damage
    tolerance."""
    return record.get("missed_target") is None and not record.get("damaged")
