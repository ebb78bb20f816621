"""OrthoGrad (Shamsian et al., "Go Beyond Your Means: Unlearning with Per-Sample Gradient Orthogonalization").

Algorithm 1 of the paper, one step:

1. g_u: gradient of the mean loss on a forget batch;
2. G_r = [g_r^1 .. g_r^k]: per-sample gradients of a retain batch;
3. g_u_perp = g_u minus its projection onto span(G_r) (QR in the paper; a Gram solve here by default, same result);
4. update direction g = alpha * mean(G_r) + (1 - alpha) * (-g_u_perp): descent on the retain loss, ascent on
   the forget loss along directions that leave every retain sample's loss unchanged to first order;
5. optimizer step on the trainable parameters (LoRA adapters by default), merged at the end by the runner.

Three schedules. ``schedule="adaptive"`` (the default, see ``methods/pressure.py``): both terms are normalised to
unit norm before mixing, so ``alpha`` is the retain share of the update whatever the gradients' norms, and after
each check of the stop rule a controller raises the forget share (then the learning rate) while the forget metric
stalls and backs off while a held-out slice of the retain set (``holdout_fraction``, never trained on) is worse
than at the start by more than ``retain_tolerance`` points. ``schedule="normalized"``: the adaptive schedule's
normalised mix with the controller off (alpha and lr stay at their starting values, no retain slice is held out);
it is the ablation that tells what the controller adds over normalising the two terms. ``schedule="fixed"`` is
Algorithm 1 exactly, with the paper's fixed alpha and learning rate (use it to reproduce the paper's tables).
The paper's ablations are options: ``retain_grads="mean"`` projects against the mean retain gradient only,
``lora=None`` trains all parameters, ``alpha=0`` is pure orthogonal ascent. ``projection_scope="per_tensor"`` is
the per-tensor projection of the code found online (see docs/design.md for why it is not the default).
Per-sample engine: ``engine="auto"`` uses the ghost engine (``grads/ghost.py``: k x k Gram blocks from layer inputs
and output gradients, never the [k, d] matrix; always the Gram solve) when every trainable parameter sits in a
supported layer, else torch.func's ``"vmap_or_loop"`` (vmap, and the batch-size-1 loop where vmap rejects the
model). ``projection="qr"``, ``projection_scope="per_tensor"`` and ``retain_grads="mean"``
take the reference path (torch.func + ``project_out``). The choice is logged and recorded as ``engine_ghost``.
Where the code is: the forget gradient and the retain span come from a gradient source (``orthograd_gradients.py``;
``distributed/orthograd.py`` for data-parallel ranks), the direction from ``direction.py``; this module holds the
config, the schedules' weights and statistics, and the adaptive controller.
An epoch is one pass over the forget set; retain batches are drawn from a reshuffled cycle of the retain set.
BatchNorm layers run in eval mode throughout (per-sample gradients cannot update running statistics).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from orthograd.methods.base import (
    IterativeConfig,
    MethodConfig,
    MethodContext,
    OptimizerName,
    UnlearningMethod,
    make_optimizer,
)
from orthograd.methods._common import set_lr
from orthograd.methods.direction import orthograd_direction
from orthograd.methods.orthograd_gradients import GradientSource, LocalGradients, choose_engine
from orthograd.methods.pressure import ForgetPressure, ProgressMeter, retain_drop, sampling_noise
from orthograd.methods.registry import register
from orthograd.damage import HoldoutReading
from orthograd.input_checks import dataset_of

# What ``None`` resolves to under each schedule (see OrthoGradConfig).
SCHEDULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "fixed": {"alpha": 0.9, "lr": 1e-3, "optimizer": "sgd", "forget_batch_size": 128, "retain_batch_size": 256},
    "adaptive": {"alpha": 0.5, "lr": 1e-3, "optimizer": "adam", "forget_batch_size": 32, "retain_batch_size": 64},
}
SCHEDULE_DEFAULTS["normalized"] = SCHEDULE_DEFAULTS["adaptive"]  # the same starting point, without the controller
Schedule = Literal["adaptive", "normalized", "fixed"]

log = logging.getLogger(__name__)
_TINY = 1e-30
_CHECKS_PER_EPOCH = 4
_HOLDOUT_BATCH = 256
_ACTION_CODES = {"back_off": -1.0, "hold": 0.0, "raise": 1.0}


@dataclass
class OrthoGradConfig(IterativeConfig):
    """OrthoGrad hyperparameters; ``None`` means the schedule's default.

    schedule: "adaptive" (tuning-free: normalised terms, forget pressure controlled by the run's measurements),
        "normalized" (the same normalised terms and defaults, alpha and lr held fixed: the controller's ablation) or
        "fixed" (Algorithm 1 as written, the paper's fixed alpha and lr).
    alpha: weight of the mean retain gradient. Fixed: the paper's alpha on raw gradients (default 0.9; 0.9 random,
        0.8 class forgetting in Appendix A.1; 0.05-0.5 for ASR). Adaptive: the starting retain share of the
        normalised update (default 0.5); normalized: its retain share throughout (default 0.5).
    lr, optimizer, forget_batch_size, retain_batch_size: fixed defaults 1e-3, "sgd", 128, 256 (the library's
        paper-style defaults); adaptive and normalized defaults 1e-3 (adaptive: the starting lr), "adam", 32, 64.
        Left at its default under these two schedules, the forget batch shrinks for small forget sets so that an
        epoch has at least 4 steps (``ceil(n / 4)``: 2 for 5 sequences), one per check of the controller.
    holdout_fraction, retain_tolerance (adaptive only): the share of the retain set held out to watch for damage
        (at least one sample; never trained on), and how many metric points it may lose before the controller
        backs off (at least the slice's sampling noise: two binomial standard errors).
    retain_grads: "per_sample" (OrthoGrad) or "mean" (the "OrthoGrad Mean" ablation).
    projection: "auto" | "gram" | "qr" solver; projection_scope: "global" (Algorithm 1) or "per_tensor".
    chunk_size: samples per forward/backward chunk (bounds memory); engine: "auto" (ghost, else vmap_or_loop) |
        "ghost" | "vmap_or_loop" | "vmap" | "loop".
    bf16: run forward and backward under bfloat16 autocast (the projection solve stays float64).
    fuse_passes: ghost engine only: take the forget batch into the retain batch's forward and backward (one pass
        instead of two, where that is exact). Faster on a CPU (a forward and backward less) but both batches'
        activations are alive at once. "auto" (default) fuses when the device's free memory holds the forget rows'
        activations with a 2x margin (estimated from the previous step's pass; the first step and steps with a
        chunk_size run two passes); True always, False never.
    """

    schedule: Schedule = "adaptive"
    alpha: float | None = None  # type: ignore[assignment]
    lr: float | None = None  # type: ignore[assignment]
    optimizer: OptimizerName | None = None  # type: ignore[assignment]
    forget_batch_size: int | None = None  # type: ignore[assignment]
    retain_batch_size: int | None = None  # type: ignore[assignment]
    holdout_fraction: float = 0.1
    retain_tolerance: float = 2.0
    retain_grads: Literal["per_sample", "mean"] = "per_sample"
    projection: Literal["auto", "qr", "gram"] = "auto"
    projection_scope: Literal["global", "per_tensor"] = "global"
    chunk_size: int | None = None
    engine: Literal["auto", "ghost", "vmap_or_loop", "vmap", "loop"] = "auto"
    bf16: bool = False
    fuse_passes: Literal[True, False, "auto"] = "auto"

    def __post_init__(self) -> None:
        self._forget_batch_defaulted = self.forget_batch_size is None
        # an unknown schedule fills nothing here; the base class's Literal check refuses it first thing
        for name, default in SCHEDULE_DEFAULTS.get(self.schedule, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        super().__post_init__()
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.retain_tolerance < 0:
            raise ValueError(f"retain_tolerance must be >= 0 metric points, got {self.retain_tolerance}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.alpha == 1.0:
            raise ValueError("alpha=1 ignores the forget set entirely (that is Finetune); use alpha < 1")
        if self.schedule != "fixed" and not 0.0 < self.alpha < 1.0:
            raise ValueError(f"the {self.schedule} schedule mixes unit-norm terms with a retain share alpha in (0, 1), "
                             f"got {self.alpha}")
        if self.engine == "ghost" and (self.projection == "qr" or self.projection_scope == "per_tensor"):
            raise ValueError("engine='ghost' solves the global Gram system; use engine='vmap' for projection='qr' "
                             "or projection_scope='per_tensor'")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")


@register
class OrthoGrad(UnlearningMethod[OrthoGradConfig]):
    """Forget-gradient ascent projected orthogonally to every per-sample retain gradient, plus alpha * retain
    descent."""

    name: ClassVar[str] = "orthograd"

    def __init__(self, config: OrthoGradConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        self.forget_batch_size = forget_batch_size(config, context.forget)
        self.params = context.trainable_parameters()
        self.optimizer = make_optimizer(config, list(self.params.values()))
        self.controller = _AdaptiveControl(config, context) if config.schedule == "adaptive" else None
        training_context = self.controller.training_context if self.controller is not None else context
        self._retain = context.endless(training_context.loader("retain", batch_size=config.retain_batch_size))
        engine = choose_engine(config, context.model, self.params)
        self.gradients: GradientSource = LocalGradients(config, context, self.params, engine)

    def checks_per_epoch(self) -> int | None:
        """The adaptive schedule wants the stop rule checked 4 times an epoch (it steers on those checks)."""
        return _CHECKS_PER_EPOCH if self.controller is not None else None

    def hint_when_target_missed(self) -> str:
        if self.config.schedule == "normalized":
            return "lower alpha (the retain share of the update) or schedule='adaptive'"
        if self.controller is None:
            return (
                "lower alpha (e.g. 0.2: the fixed schedule's retain term can drown the forget term) "
                "or schedule='adaptive'"
            )
        if self.controller.last_action == "back_off":
            return "raise retain_tolerance (forgetting further was degrading the held-out retain slice)"
        return "raise max_epochs (the adaptive schedule was still raising the forget pressure)"

    def hint_when_damaged(self) -> str:
        if self.controller is None:
            return f"lower lr (it was {self.config.lr:g}) or raise alpha (the retain weight, {self.config.alpha:g})"
        return f"lower lr (the adaptive schedule started from lr={self.config.lr:g}; its default is 1e-3)"

    def holdout(self) -> HoldoutReading | None:
        """The adaptive schedule's held-out retain slice as of its latest check (None: fixed schedule)."""
        return self.controller.reading() if self.controller is not None else None

    def restores_best_state(self) -> bool:
        return self.controller is not None

    def describe(self) -> list[str]:
        facts = [f"schedule {self.config.schedule}", f"engine {self.engine}"]
        if self.controller is not None:
            facts.append(
                f"held out {self.controller.holdout_size} of the retain samples (tolerance "
                f"{self.controller.tolerance:.1f} points)"
            )
        return facts

    def plan(self, *, target: float | None, max_epochs: int | None, max_steps: int | None = None) -> None:
        """Give the controller the stop rule's target and the run's step budget, so that it raises the pressure
        when forgetting is too slow to arrive in time (adaptive schedule)."""
        if self.controller is None:
            return
        loader = self.context.loader("forget", batch_size=self.forget_batch_size)
        try:
            steps: int | None = None if max_epochs is None else max_epochs * len(loader)
        except TypeError:  # an iterable-style loader has no length: pace on max_steps alone, if given
            steps = None
        budgets = [b for b in (steps, max_steps) if b is not None]
        if budgets:
            self.controller.pace(target=target, budget=min(budgets))

    @property
    def controller_actions(self) -> dict[str, int]:
        """How many checks the adaptive controller raised, backed off and held at (empty for the fixed schedule)."""
        return dict(self.controller.actions) if self.controller is not None else {}

    def observe(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Feed a check of the stop rule to the controller (adaptive schedule); its decision is returned."""
        if self.controller is None:
            return {}
        decision = self.controller.observe(metrics, self.context.model)
        set_lr(self.optimizer, self.controller.pressure.lr)
        return decision

    @property
    def engine(self) -> str:
        """The per-sample engine that ran last ("ghost", "vmap" or "loop"; the one chosen before the first step)."""
        return self.gradients.engine

    def run_epoch(self, epoch: int) -> Iterator[dict[str, float]]:
        forget_loader = self.context.loader("forget", batch_size=self.forget_batch_size)
        for forget_batch in self.context.batches(forget_loader):
            yield self.step(forget_batch, next(self._retain))

    def update_direction(
        self, forget_batch: Any, retain_batch: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The descent direction alpha * mean(G_r) - (1 - alpha) * g_u_perp (empty when a gradient is not finite),
        and step statistics."""
        grads = self.gradients.compute(forget_batch, retain_batch)
        direction = orthograd_direction(forget_grad=grads.forget_grad, span=grads.span, weights=self._weights)
        retain_loss = grads.span.retain_loss
        if direction is None:
            return {}, {"forget_loss": grads.forget_loss, "retain_loss": retain_loss, "finite_grads": math.nan}
        stats = self._stats(grads.forget_loss, retain_loss, alpha=direction.alpha, norms=direction.norms)
        return direction.update, stats

    def _weights(self, *, retain_norm: float, orthogonal_norm: float) -> tuple[float, float, float]:
        """(alpha, retain weight, forget weight) of ``retain_weight * mean(G_r) - forget_weight * g_u_perp``.

        Fixed schedule: alpha and 1 - alpha (Algorithm 1). Adaptive: the controller's alpha with each term scaled
        to unit norm, so that alpha is the retain share of the update whatever the norms; normalized: the same with
        the config's alpha.
        """
        if self.config.schedule == "fixed":
            return self.config.alpha, self.config.alpha, 1.0 - self.config.alpha
        alpha = self.controller.pressure.alpha if self.controller is not None else self.config.alpha
        return alpha, alpha / max(retain_norm, _TINY), (1.0 - alpha) / max(orthogonal_norm, _TINY)

    def _stats(
        self, forget_loss: float, retain_loss: float, *, alpha: float, norms: Mapping[str, float]
    ) -> dict[str, float]:
        """The step statistics the history records (and the adaptive controller's forget-loss window)."""
        if self.controller is not None:
            self.controller.record_forget_loss(forget_loss)
        return {
            "forget_loss": forget_loss,
            "retain_loss": retain_loss,
            "kept_fraction": norms["orthogonal"] / max(norms["forget"], _TINY),
            "retain_to_forget_norm": norms["retain"] / max(norms["orthogonal"], _TINY),
            "engine_ghost": float(self.engine == "ghost"),
            "alpha": alpha,
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    def step(self, forget_batch: Any, retain_batch: Any) -> dict[str, float]:
        direction, stats = self.update_direction(forget_batch, retain_batch)
        if not direction:  # non-finite gradients: no update; the runner sees the NaN statistic and stops
            return stats
        for name, param in self.params.items():
            param.grad = direction[name].to(param.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats


class _AdaptiveControl:
    """The adaptive schedule's state: the held-out retain slice, the forget pressure and the progress meter."""

    def __init__(self, config: OrthoGradConfig, context: MethodContext) -> None:
        train_part, holdout = split_holdout(
            context.retain, fraction=config.holdout_fraction, generator=context.generator
        )
        self.training_context = dataclasses.replace(context, retain=train_part)
        self.context, self.task, self.holdout = context, context.task, holdout
        self.holdout_start = context.evaluate_held_out(context.model, holdout, batch_size=_HOLDOUT_BATCH)
        # a drop counts once it exceeds the user's tolerance and the slice's own sampling noise
        self.holdout_size = len(holdout)
        self.noise = sampling_noise(metric=self.holdout_start, size=self.holdout_size)
        self.tolerance = max(config.retain_tolerance, self.noise)
        self.holdout_now: float | None = None
        self.pressure = ForgetPressure(share=1.0 - config.alpha, lr=config.lr, patience=_CHECKS_PER_EPOCH)
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
        action = self.pressure.update(progressed=progressed, retain_degraded=drop > self.tolerance)
        self.last_action = action
        self.actions[action] += 1
        log.debug("adaptive check: forget %.2f, holdout drop %.2f -> %s", seen["forget"], drop, action)
        return {"holdout_retain": holdout_now, "control": _ACTION_CODES[action]}


def forget_batch_size(config: OrthoGradConfig, forget: Dataset | DataLoader) -> int:
    """The forget batch of a run: the config's, cut to ``ceil(n / 4)`` for a small forget set when the adaptive (or
    normalized) schedule's default was left in place (so the controller's four checks an epoch each follow a step;
    the normalized ablation takes the same batches)."""
    if config.schedule == "fixed" or not config._forget_batch_defaulted or isinstance(forget, DataLoader):
        return config.forget_batch_size
    size = len(dataset_of(forget))  # type: ignore[arg-type]
    return max(1, min(config.forget_batch_size, math.ceil(size / _CHECKS_PER_EPOCH)))


def split_holdout(
    retain: Dataset | DataLoader, *, fraction: float, generator: torch.Generator
) -> tuple[Dataset, Dataset]:
    """(training part, held-out part) of the retain set: a random ``fraction`` (at least one sample) held out.

    A retain set of one sample cannot be split: it is then both (the slice still tells if that sample degrades).
    """
    dataset = dataset_of(retain)
    size = len(dataset)  # type: ignore[arg-type]
    if size < 2:
        return dataset, dataset
    order = torch.randperm(size, generator=generator).tolist()
    held = min(size - 1, max(1, round(fraction * size)))
    return Subset(dataset, order[held:]), Subset(dataset, order[:held])


@dataclass
class FixedOrthoGradConfig(OrthoGradConfig):
    """``OrthoGradConfig`` with the paper's fixed schedule as the default (Algorithm 1 as written)."""

    schedule: Schedule = "fixed"


@register
class FixedOrthoGrad(OrthoGrad):
    """OrthoGrad registered with ``schedule="fixed"`` by default, so a benchmark can list it beside the default."""

    name: ClassVar[str] = "orthograd-fixed"
    config_class: ClassVar[type[MethodConfig]] = FixedOrthoGradConfig


@dataclass
class NormalizedOrthoGradConfig(OrthoGradConfig):
    """``OrthoGradConfig`` with ``schedule="normalized"`` as the default (unit-norm terms, no controller)."""

    schedule: Schedule = "normalized"


@register
class NormalizedOrthoGrad(OrthoGrad):
    """OrthoGrad registered with ``schedule="normalized"`` by default: the adaptive schedule's ablation (fixed
    alpha 0.5 on unit-norm terms, fixed lr, no controller), listed beside the default in an ablation benchmark."""

    name: ClassVar[str] = "orthograd-normalized"
    config_class: ClassVar[type[MethodConfig]] = NormalizedOrthoGradConfig
