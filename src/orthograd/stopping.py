"""Stopping rules of the paper (Section 5.2), as predicates on an evaluation row of the run history.

Every named rule declares the task metrics it can read and which way forgetting moves them, so that a rule that
does not fit the task (a WER target on a classifier) is refused before a step is taken. A new rule is one
``register_stop_rule(StopRuleSpec(...))`` call: its name, the metrics it reads, its direction and how it is built
from the original model's metrics.

Language models: ``stop="random"`` with ``test=`` never-trained QA pairs (forget answers no more likely than
never-seen ones); ``orthograd.tasks.tofu.TruthRatioRule`` (truth ratios indistinguishable from never-seen
questions', KS p >= 0.05) for TOFU-style data, passed as ``stop=``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Literal

StopRule = Callable[[Mapping[str, Any]], bool]
Direction = Literal["falls", "rises"]  # which way forgetting moves the metric a rule reads
RANDOM_TOLERANCE_POINTS = 0.5
CLASS_THRESHOLD_PERCENT = 1.0
WER_TARGET_PERCENT = 75.0
STALL_POINTS = 0.5  # a forget metric that moves less than this (in points) from here on has stopped moving
ACCURACY_LIKE: tuple[str, ...] = ("accuracy", "answer_probability", "rouge_l")
NO_RULE = "never"  # stop="never": run the whole budget, no rule inferred (fixed-budget protocols)


@dataclass(eq=False, repr=False)
class ForgetMetricRule:
    """A stop rule that reads only the forget-set metric, so the runner may evaluate just that set to check it.

    A plain callable rule is given full evaluation rows; this one declares ``needs = ("forget",)``, the task
    metrics it can read (``metrics``) with the way forgetting moves them (``direction``), and ``target``: the
    forget metric value where it fires (what OrthoGrad's adaptive schedule paces its pressure on).
    """

    needs: ClassVar[tuple[str, ...]] = ("forget",)

    predicate: Callable[[float], bool]
    description: str
    _: KW_ONLY
    metrics: tuple[str, ...] = ()
    direction: Direction = "falls"
    target: float | None = None

    def __call__(self, row: Mapping[str, Any]) -> bool:
        return bool(self.predicate(row["forget"]))

    def __repr__(self) -> str:
        return f"ForgetMetricRule({self.description})"


def random_forgetting_rule(*, original_test: float, tolerance: float = RANDOM_TOLERANCE_POINTS) -> StopRule:
    """Stop once forget accuracy is within ``tolerance`` points of the original test accuracy, or lower."""
    limit = original_test + tolerance
    return ForgetMetricRule(
        lambda forget: forget <= limit, f"forget <= {limit:.2f}", metrics=ACCURACY_LIKE, target=limit
    )


def class_forgetting_rule(*, threshold: float = CLASS_THRESHOLD_PERCENT) -> StopRule:
    """Stop once forget accuracy is below ``threshold`` percent."""
    return ForgetMetricRule(
        lambda forget: forget < threshold, f"forget < {threshold}", metrics=ACCURACY_LIKE, target=threshold
    )


def wer_target_rule(*, threshold: float = WER_TARGET_PERCENT) -> StopRule:
    """Speaker unlearning (ASR): stop once the forget-set WER reaches ``threshold`` percent."""
    return ForgetMetricRule(
        lambda forget: forget >= threshold, f"forget WER >= {threshold}", metrics=("wer",), direction="rises",
        target=threshold,
    )


@dataclass(frozen=True)
class StopRuleSpec:
    """A named stop rule: the task metrics it reads, which way forgetting moves them, and how it is built.

    ``build`` receives the original model's metrics per set (``{"forget": ..., "retain": ..., "test": ...}``);
    ``needs_test`` rules compare with the test set and are refused without one.
    """

    name: str
    metrics: tuple[str, ...]
    direction: Direction
    build: Callable[[Mapping[str, float]], StopRule]
    description: str
    needs_test: bool = False


_RULES: dict[str, StopRuleSpec] = {}


def register_stop_rule(spec: StopRuleSpec) -> StopRuleSpec:
    """Make ``spec`` selectable as ``unlearn(stop=spec.name)``."""
    _RULES[spec.name] = spec
    return spec


def stop_rules() -> dict[str, StopRuleSpec]:
    """The named stop rules, by name."""
    return dict(_RULES)


def rules_for(metrics: Sequence[str]) -> list[str]:
    """The names of the rules that read one of ``metrics`` (what a task produces)."""
    return [name for name, spec in _RULES.items() if set(spec.metrics) & set(metrics)]


register_stop_rule(StopRuleSpec(
    "random", ACCURACY_LIKE, "falls", lambda original: random_forgetting_rule(original_test=original["test"]),
    f"forget metric within {RANDOM_TOLERANCE_POINTS} points of the original test metric, or lower", needs_test=True,
))
register_stop_rule(StopRuleSpec(
    "class", ACCURACY_LIKE, "falls", lambda original: class_forgetting_rule(),
    f"forget metric below {CLASS_THRESHOLD_PERCENT}%",
))
register_stop_rule(StopRuleSpec(
    "speaker", ("wer",), "rises", lambda original: wer_target_rule(), f"forget WER at least {WER_TARGET_PERCENT}%",
))


def check_stop(stop: str | StopRule | None, *, metrics: Sequence[str] | None = None) -> StopRuleSpec | None:
    """Validate the ``stop=`` argument before anything runs; the named rule's spec (None: a callable, or no rule).

    ``metrics`` are what the task produces (``Task.metrics``): a rule that reads none of them is refused, naming
    the rules that fit. A callable that declares ``metrics`` (a ``ForgetMetricRule``) is checked the same way.
    """
    if stop is None or stop == NO_RULE:
        return None
    if callable(stop):
        declared = getattr(stop, "metrics", ())
        if metrics is not None and declared and not set(declared) & set(metrics):
            raise ValueError(
                f"the stop rule {stop!r} reads {_names(declared)}, but this task produces {_names(metrics)}; "
                f"rules that fit: {_names(rules_for(metrics)) or 'none built in'} (or a callable(history_row) -> bool)"
            )
        return None
    spec = _RULES.get(stop) if isinstance(stop, str) else None
    if spec is None:
        raise ValueError(
            f"stop must be None, {', '.join(repr(n) for n in _RULES)}, {NO_RULE!r} or a callable(history_row) -> "
            f"bool; got {stop!r}"
        )
    if metrics is not None and not set(spec.metrics) & set(metrics):
        raise ValueError(
            f"stop={stop!r} reads {_names(spec.metrics)}, but this task produces {_names(metrics)}; "
            f"rules that fit: {_names(rules_for(metrics)) or 'none built in'} (or a callable(history_row) -> bool)"
        )
    return spec


def resolve_stop(
    stop: str | StopRule | None, *, original: Mapping[str, float], metrics: Sequence[str] | None = None
) -> StopRule | None:
    """Turn the ``stop=`` argument of ``unlearn`` into a predicate (None, ``"never"``: no rule); see ``check_stop``.
    """
    spec = check_stop(stop, metrics=metrics)
    if spec is None:
        return stop if callable(stop) else None
    if spec.needs_test and "test" not in original:
        raise ValueError(f"stop={stop!r} compares with the original test metric: pass test=<held-out data>")
    return spec.build(original)


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)


def infer_stop(
    metrics: Sequence[str], *, forget_classes: set[int] | None, retain_classes: set[int] | None, has_test: bool
) -> tuple[str, str] | None:
    """The rule a call without ``stop=`` ends on, and why: "class" when the forget set's classes are absent from
    the retain set (class forgetting), else "random" when a test set is given; None when neither is well defined.
    """
    fits = set(rules_for(metrics))
    if "class" in fits and forget_classes and retain_classes is not None and not forget_classes & retain_classes:
        shown = ", ".join(str(c) for c in sorted(forget_classes)[:5])
        return "class", f"the forget set's classes ({shown}) are absent from the retain set"
    if "random" in fits and has_test:
        return "random", "a test set is given"
    return None


def stalled_at(history: Sequence[Mapping[str, Any]], *, points: float = STALL_POINTS) -> Mapping[str, Any] | None:
    """The first row from which the forget metric stayed within ``points`` of its final value (None: no rows)."""
    rows = [row for row in history if "forget" in row]
    if not rows:
        return None
    last = rows[-1]["forget"]
    first = len(rows) - 1
    while first > 0 and abs(rows[first - 1]["forget"] - last) <= points:
        first -= 1
    return rows[first]
