"""The adaptive schedule of OrthoGrad: a controller of the forget pressure, driven by what a run measures anyway.

Why: with fixed hyperparameters the share of the update that forgets depends on how the norms of the orthogonal
forget gradient and the mean retain gradient compare, which changes with the model, the data and the forget-set
size (on Fashion-MNIST random forgetting, alpha = 0.9 left ~1% of the update to forgetting: at lr 1e-3 with forget
batch 128 nothing was forgotten in 30 epochs; other learning rates and batch sizes did forget).
The adaptive schedule therefore

1. normalises both terms before mixing, so ``share`` (= 1 - alpha) is the fraction of the update that forgets,
   whatever the norms;
2. after each check of the stop rule, raises the pressure while forgetting is too slow (first the share,
   halving the retain share, then, at the largest share, the learning rate), and backs off (halving the share,
   then a raised learning rate back toward its start) when the held-out retain slice (carved from the retain set,
   never trained on) has degraded by more than its sampling noise and the user's tolerance.

"Too slow": when the stop rule names the forget metric's target and the run's step budget is known, forgetting
is on pace when the metric, moving as fast as it did since the last check, would reach the target within the
steps left; otherwise (a custom rule, no rule) when the metric did not move toward forgetting and the forget loss
did not rise. The pace test is what makes the controller act on continuous metrics (a language model's answer
probability falls a little at every check, so it never "stalls", yet at that speed it would not arrive).

``AdaptiveController`` holds the run's state (the held-out slice, the rule, the meter, the forget-loss window);
``ControllerRule``, ``ProgressMeter`` and the functions below are plain arithmetic on scalars, so the rule can be
tested without a model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from orthograd.damage import HoldoutReading
from orthograd.input_checks import dataset_of
from orthograd.methods.base import MethodContext
from orthograd.methods.orthograd.config import OrthoGradConfig
from orthograd.tasks.batches import dataset_size

Action = Literal["raise", "back_off", "hold"]
CHECKS_PER_EPOCH = 4  # checks of the stop rule per epoch the adaptive schedule asks for (it steers on them)
_HOLDOUT_BATCH = 256
_ACTION_CODES = {"back_off": -1.0, "hold": 0.0, "raise": 1.0}

log = logging.getLogger(__name__)


@dataclass
class ControllerRule:
    """The forget share and learning rate of an adaptive OrthoGrad run, and the rule that moves them.

    ``share`` stays in [min_share, max_share]; ``lr`` in [lr_start, lr_start * lr_range]: backing off never takes
    the learning rate below its start (a run that did so stalled for good on Fashion-MNIST random forgetting).
    A raise needs ``patience`` stalled checks in a row (OrthoGrad: one epoch's worth): raising at every stalled
    check drove the share from 0.5 to 0.95 within one epoch on noise and cost 3 points of test accuracy.
    """

    share: float
    lr: float
    min_share: float = 0.05
    max_share: float = 0.95
    lr_range: float = 16.0
    patience: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.min_share <= self.share <= self.max_share < 1.0:
            raise ValueError(
                f"need 0 < min_share <= share <= max_share < 1, got {self.min_share}, {self.share}, {self.max_share}"
            )
        if not (self.lr > 0 and self.lr_range >= 1):
            raise ValueError(f"need lr > 0 and lr_range >= 1, got {self.lr}, {self.lr_range}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1 check, got {self.patience}")
        self._lr_low = self.lr
        self._lr_high = self.lr * self.lr_range
        self._stalls = 0

    @property
    def alpha(self) -> float:
        """The weight of the (normalised) mean retain gradient, the paper's alpha."""
        return 1.0 - self.share

    def update(self, *, progressed: bool, retain_degraded: bool) -> Action:
        """Apply the rule to one check: back off on retain damage, raise after ``patience`` stalls, else hold."""
        self._stalls = 0 if (progressed or retain_degraded) else self._stalls + 1
        if retain_degraded:
            if self.share > self.min_share:
                self.share = max(self.min_share, self.share / 2)
            else:
                self.lr = max(self._lr_low, self.lr / 2)
            return "back_off"
        if self._stalls >= self.patience:
            self._stalls = 0
            if self.share < self.max_share:
                self.share = min(self.max_share, 1.0 - (1.0 - self.share) / 2)
            else:
                self.lr = min(self._lr_high, self.lr * 2)
            return "raise"
        return "hold"


@dataclass
class ProgressMeter:
    """Did forgetting progress enough since the last check?

    With a ``target`` (the forget metric value the stop rule waits for) and the number of steps left: whether the
    metric is on pace to reach it in time (``on_pace``). Without: whether the forget metric moved toward
    forgetting, or the forget loss (averaged over the steps since the last check) rose by ``loss_rise`` relative
    to the previous window (the loss is the earlier signal: on class forgetting, accuracy sits at 100% for a
    while before it falls). ``higher_is_better`` is the task metric's direction (accuracy: True, WER: False);
    forgetting moves against it.
    """

    higher_is_better: bool
    loss_rise: float = 0.1
    target: float | None = None
    _metric: float | None = None
    _loss: float | None = None

    def progressed(
        self, *, forget_metric: float, forget_loss: float, steps: int = 1, steps_left: int | None = None
    ) -> bool:
        """``steps``: optimizer steps since the last check; ``steps_left``: steps the budget still allows."""
        metric_before, loss_before = self._metric, self._loss
        self._metric, self._loss = forget_metric, forget_loss
        if metric_before is None or loss_before is None:
            return True  # the first check has no window to compare with
        if self.target is not None and steps_left is not None:
            # past the target (a rule that reads another metric, e.g. truth ratios, has not fired yet): no raise
            if (forget_metric <= self.target) if self.higher_is_better else (forget_metric >= self.target):
                return True
            return on_pace(before=metric_before, now=forget_metric, target=self.target, steps=steps,
                           steps_left=steps_left)
        moved = metric_before - forget_metric if self.higher_is_better else forget_metric - metric_before
        return moved > 0 or forget_loss > loss_before * (1.0 + self.loss_rise)


def on_pace(*, before: float, now: float, target: float, steps: int, steps_left: int) -> bool:
    """Whether a metric that went from ``before`` to ``now`` in ``steps`` steps, still moving toward ``target``
    at that rate, reaches it within ``steps_left`` more steps (linear extrapolation; at the target: True)."""
    gap = abs(now - target)
    if gap == 0.0:
        return True
    rate = (abs(before - target) - gap) / max(steps, 1)
    return rate > 0 and rate * steps_left >= gap


def retain_drop(*, before: float, now: float, higher_is_better: bool) -> float:
    """How many metric points the held-out retain slice got worse by (negative: it got better)."""
    return before - now if higher_is_better else now - before


def sampling_noise(*, metric: float, size: int) -> float:
    """Two binomial standard errors, in points, of a percentage measured on ``size`` samples.

    A held-out slice of 30 samples at 93% accuracy moves by ~9 points between two equally good models; a drop
    smaller than that is not evidence of damage. The rate is kept off 0 and 100 (by half a sample) so that a
    perfect slice still has a noise level. For a WER the same formula is an approximation (words are not
    independent samples).
    """
    rate = min(max(metric / 100.0, 0.5 / size), 1.0 - 0.5 / size)
    return 200.0 * math.sqrt(rate * (1.0 - rate) / size)


class AdaptiveController:
    """The adaptive schedule's state: the held-out retain slice, the rule moving share and lr, the progress meter.

    It trains on ``training_context`` (the retain set less the slice), records each step's forget loss, and at each
    check of the stop rule (``observe``) raises, holds or backs off.
    """

    def __init__(self, config: OrthoGradConfig, context: MethodContext) -> None:
        train_part, holdout = split_holdout(
            context.retain, fraction=config.holdout_fraction, generator=context.generator
        )
        self.training_context = dataclasses.replace(context, retain=train_part)
        self.context, self.task, self.holdout = context, context.task, holdout
        self.holdout_start = context.evaluate_held_out(context.model, holdout, batch_size=_HOLDOUT_BATCH)
        # a drop counts once it exceeds the user's tolerance and the slice's own sampling noise
        self.holdout_size = dataset_size(holdout)
        self.noise = sampling_noise(metric=self.holdout_start, size=self.holdout_size)
        self.tolerance = max(config.retain_tolerance, self.noise)
        self.holdout_now: float | None = None
        assert config.alpha is not None and config.lr is not None, "OrthoGradConfig fills the schedule's defaults"
        self.rule = ControllerRule(share=1.0 - config.alpha, lr=config.lr, patience=CHECKS_PER_EPOCH)
        self.meter = ProgressMeter(higher_is_better=self.task.higher_is_better)
        self._losses: list[float] = []
        self.steps = 0
        self.budget: int | None = None
        self.last_action: str | None = None
        self.actions: dict[str, int] = {action: 0 for action in _ACTION_CODES}

    def reading(self) -> HoldoutReading | None:
        """The slice's metric before the run and at the latest check (None before the first check)."""
        if self.holdout_now is None:
            return None
        return HoldoutReading(before=self.holdout_start, now=self.holdout_now, noise=self.noise)

    def pace(self, *, target: float | None, budget: int) -> None:
        """Raise when the forget metric is not on pace to reach ``target`` within ``budget`` steps in all."""
        self.meter.target = target
        self.budget = budget

    def record_forget_loss(self, loss: float) -> None:
        self._losses.append(loss)
        self.steps += 1

    def observe(self, metrics: Mapping[str, float], model: nn.Module) -> dict[str, float]:
        """One check: did forgetting progress, did the held-out slice degrade; move the pressure accordingly."""
        if "forget" not in metrics or not self._losses:
            return {}
        # every process of a data-parallel run must take the same decision: it decides on the run's numbers
        window = len(self._losses)
        seen = self.context.agree({"forget": metrics["forget"], "loss": sum(self._losses) / window})
        self._losses.clear()
        steps_left = None if self.budget is None else max(0, self.budget - self.steps)
        progressed = self.meter.progressed(
            forget_metric=seen["forget"], forget_loss=seen["loss"], steps=window, steps_left=steps_left
        )
        was_training = model.training
        holdout_now = self.context.evaluate_held_out(model, self.holdout, batch_size=_HOLDOUT_BATCH)
        self.holdout_now = holdout_now
        model.train(was_training)
        drop = retain_drop(before=self.holdout_start, now=holdout_now, higher_is_better=self.task.higher_is_better)
        action = self.rule.update(progressed=progressed, retain_degraded=drop > self.tolerance)
        self.last_action = action
        self.actions[action] += 1
        log.debug("adaptive check: forget %.2f, holdout drop %.2f -> %s", seen["forget"], drop, action)
        return {"holdout_retain": holdout_now, "control": _ACTION_CODES[action]}


def split_holdout(
    retain: Dataset[Any] | DataLoader[Any], *, fraction: float, generator: torch.Generator
) -> tuple[Dataset[Any], Dataset[Any]]:
    """(training part, held-out part) of the retain set: a random ``fraction`` (at least one sample) held out.

    A retain set of one sample cannot be split: it is then both (the slice still tells if that sample degrades).
    """
    dataset = dataset_of(retain)
    size = dataset_size(dataset)
    if size < 2:
        return dataset, dataset
    order = torch.randperm(size, generator=generator).tolist()
    held = min(size - 1, max(1, round(fraction * size)))
    return Subset(dataset, order[held:]), Subset(dataset, order[:held])
