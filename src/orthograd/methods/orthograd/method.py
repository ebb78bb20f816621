"""OrthoGrad (Shamsian et al., "Go Beyond Your Means: Unlearning with Per-Sample Gradient Orthogonalization").

Algorithm 1 of the paper, one step:

1. g_u: gradient of the mean loss on a forget batch;
2. G_r = [g_r^1 .. g_r^k]: per-sample gradients of a retain batch;
3. g_u_perp = g_u minus its projection onto span(G_r) (QR in the paper; a Gram solve here by default, same result);
4. update direction g = alpha * mean(G_r) + (1 - alpha) * (-g_u_perp): descent on the retain loss, ascent on
   the forget loss along directions that leave every retain sample's loss unchanged to first order;
5. optimizer step on the trainable parameters (LoRA adapters by default), merged at the end by the runner.

Three schedules. ``schedule="adaptive"`` (the default, see ``controller.py``): both terms are normalised to
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
Where the code is: the settings in ``config.py``; the forget gradient and the retain span come from a gradient source
(``gradients.py``; ``distributed/orthograd.py`` for data-parallel ranks), the direction from ``direction.py``, the
adaptive schedule's decisions from ``controller.py``; this module holds the step and its statistics.
An epoch is one pass over the forget set; retain batches are drawn from a reshuffled cycle of the retain set.
BatchNorm layers run in eval mode throughout (per-sample gradients cannot update running statistics).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader, Dataset

from orthograd.damage import HoldoutReading
from orthograd.input_checks import dataset_of
from orthograd.methods._common import set_lr
from orthograd.methods.base import MethodConfig, MethodContext, UnlearningMethod, make_optimizer
from orthograd.methods.orthograd.config import FixedOrthoGradConfig, NormalizedOrthoGradConfig, OrthoGradConfig
from orthograd.methods.orthograd.controller import CHECKS_PER_EPOCH, AdaptiveController
from orthograd.methods.orthograd.direction import orthograd_direction
from orthograd.methods.orthograd.gradients import GradientSource, LocalGradients, choose_engine
from orthograd.methods.registry import register
from orthograd.tasks.batches import dataset_size

_TINY = 1e-30


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
        self.controller = AdaptiveController(config, context) if config.schedule == "adaptive" else None
        training_context = self.controller.training_context if self.controller is not None else context
        assert config.retain_batch_size is not None, "OrthoGradConfig fills the schedule's defaults"
        self._retain = context.endless(training_context.loader("retain", batch_size=config.retain_batch_size))
        engine = choose_engine(config, context.model, self.params)
        self.gradients: GradientSource = LocalGradients(config, context, self.params, engine)

    def checks_per_epoch(self) -> int | None:
        """The adaptive schedule wants the stop rule checked 4 times an epoch (it steers on those checks)."""
        return CHECKS_PER_EPOCH if self.controller is not None else None

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
        set_lr(self.optimizer, self.controller.rule.lr)
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
        alpha = self.alpha
        direction = orthograd_direction(
            forget_grad=grads.forget_grad, span=grads.span, alpha=alpha, normalized=self.config.schedule != "fixed"
        )
        retain_loss = grads.span.retain_loss
        if direction is None:
            return {}, {"forget_loss": grads.forget_loss, "retain_loss": retain_loss, "finite_grads": math.nan}
        stats = self._stats(grads.forget_loss, retain_loss, alpha=alpha, norms=direction.norms)
        return direction.update, stats

    @property
    def alpha(self) -> float:
        """The retain share of the next update: the controller's (adaptive schedule), else the config's."""
        if self.controller is not None:
            return self.controller.rule.alpha
        assert self.config.alpha is not None, "OrthoGradConfig fills the schedule's defaults"
        return self.config.alpha

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


def forget_batch_size(config: OrthoGradConfig, forget: Dataset[Any] | DataLoader[Any]) -> int:
    """The forget batch of a run: the config's, cut to ``ceil(n / 4)`` for a small forget set when the adaptive (or
    normalized) schedule's default was left in place (so the controller's four checks an epoch each follow a step;
    the normalized ablation takes the same batches)."""
    assert config.forget_batch_size is not None, "OrthoGradConfig fills the schedule's defaults"
    if config.schedule == "fixed" or not config._forget_batch_defaulted or isinstance(forget, DataLoader):
        return config.forget_batch_size
    size = dataset_size(dataset_of(forget))
    return max(1, min(config.forget_batch_size, math.ceil(size / CHECKS_PER_EPOCH)))


@register
class FixedOrthoGrad(OrthoGrad):
    """OrthoGrad registered with ``schedule="fixed"`` by default, so a benchmark can list it beside the default."""

    name: ClassVar[str] = "orthograd-fixed"
    config_class: ClassVar[type[MethodConfig]] = FixedOrthoGradConfig


@register
class NormalizedOrthoGrad(OrthoGrad):
    """OrthoGrad registered with ``schedule="normalized"`` by default: the adaptive schedule's ablation (fixed
    alpha 0.5 on unit-norm terms, fixed lr, no controller), listed beside the default in an ablation benchmark."""

    name: ClassVar[str] = "orthograd-normalized"
    config_class: ClassVar[type[MethodConfig]] = NormalizedOrthoGradConfig
