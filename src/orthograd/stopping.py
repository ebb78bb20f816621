"""Stopping rules of the paper (Section 5.2), as predicates on an evaluation row of the run history.

Language models: ``stop="random"`` with ``test=`` never-trained QA pairs (forget answers no more likely than
never-seen ones); ``orthograd.tasks.tofu.TruthRatioRule`` (truth ratios indistinguishable from never-seen
questions', KS p >= 0.05) for TOFU-style data, passed as ``stop=``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

StopRule = Callable[[Mapping[str, Any]], bool]
RANDOM_TOLERANCE_POINTS = 0.5
CLASS_THRESHOLD_PERCENT = 1.0
WER_TARGET_PERCENT = 75.0


class ForgetMetricRule:
    """A stop rule that reads only the forget-set metric, so the runner may evaluate just that set to check it.

    A plain callable rule is given full evaluation rows; this one declares ``needs = ("forget",)``. ``target``
    is the forget metric value where it fires (what OrthoGrad's adaptive schedule paces its pressure on).
    """

    needs: tuple[str, ...] = ("forget",)

    def __init__(self, predicate: Callable[[float], bool], description: str, *, target: float | None = None) -> None:
        self.predicate = predicate
        self.description = description
        self.target = target

    def __call__(self, row: Mapping[str, Any]) -> bool:
        return bool(self.predicate(row["forget"]))

    def __repr__(self) -> str:
        return f"ForgetMetricRule({self.description})"


def random_forgetting_rule(*, original_test: float, tolerance: float = RANDOM_TOLERANCE_POINTS) -> StopRule:
    """Stop once forget accuracy is within ``tolerance`` points of the original test accuracy, or lower."""
    limit = original_test + tolerance
    return ForgetMetricRule(lambda forget: forget <= limit, f"forget <= {limit:.2f}", target=limit)


def class_forgetting_rule(*, threshold: float = CLASS_THRESHOLD_PERCENT) -> StopRule:
    """Stop once forget accuracy is below ``threshold`` percent."""
    return ForgetMetricRule(lambda forget: forget < threshold, f"forget < {threshold}", target=threshold)


def wer_target_rule(*, threshold: float = WER_TARGET_PERCENT) -> StopRule:
    """Speaker unlearning (ASR): stop once the forget-set WER reaches ``threshold`` percent."""
    return ForgetMetricRule(lambda forget: forget >= threshold, f"forget WER >= {threshold}", target=threshold)


def resolve_stop(stop: str | StopRule | None, *, original: Mapping[str, float]) -> StopRule | None:
    """Turn the ``stop=`` argument of ``unlearn`` into a predicate (None: run to ``max_epochs``)."""
    if stop is None or callable(stop):
        return stop
    if stop == "class":
        return class_forgetting_rule()
    if stop == "speaker":
        return wer_target_rule()
    if stop == "random":
        if "test" not in original:
            raise ValueError("stop='random' compares with the original test accuracy: pass test=<held-out data>")
        return random_forgetting_rule(original_test=original["test"])
    raise ValueError(
        f"stop must be None, 'random', 'class', 'speaker' or a callable(history_row) -> bool; got {stop!r}"
    )
