"""Where OrthoGrad's gradients come from each step: the forget gradient and the retain span.

``GradientSource`` is what ``OrthoGrad`` asks at every step; the data-parallel runner swaps the method's source for
one over every rank's shards (``distributed/orthograd.py``) and leaves the rest of the method as it is.
``LocalGradients`` is the single-process source: the ghost engine when the config and every trainable layer allow it
(a ``GhostSpan``; a layer that refuses at run time switches it to torch.func for good, unless ``engine="ghost"`` was
asked for), else torch.func (a ``MaterialisedSpan``; the config's torch.func engine, or "vmap_or_loop": vmap, and
the batch-size-1 loop where vmap rejects the model), and for ``retain_grads="mean"`` a span of one row, the mean
retain gradient. A source's ``engine`` names the engine that ran
last ("ghost", "vmap" or "loop"; the one chosen until a per-sample engine runs, which ``"mean"`` never does).

On the ghost engine the forget batch can join the retain batch's pass (``fuse_passes``; exact where the engine
allows it, else two passes): always with ``True``, never with ``False``, and with ``"auto"`` whenever the forget
rows' extra activations fit the device's free memory (``grads/headroom.py``), estimated from the bytes the previous
pass captured per sample (so the first step, and every step with a ``chunk_size``, runs two passes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import torch
from torch import nn

from orthograd.grads import batch_size_of, per_sample_grads_losses_and_engine
from orthograd.grads.functorch import GradEngine
from orthograd.grads.ghost import (
    GhostPlan,
    GhostSpan,
    GhostUnsupportedError,
    ghost_plan,
    ghost_span,
    ghost_span_and_mean,
    unsupported_reason,
)
from orthograd.grads.headroom import ACTIVATIONS_PER_CAPTURE, fits
from orthograd.methods.base import MethodContext
from orthograd.methods.orthograd.config import OrthoGradConfig
from orthograd.methods.orthograd.span import MaterialisedSpan, RetainSpan

log = logging.getLogger(__name__)
_T = TypeVar("_T")
ChosenEngine = Literal["ghost"] | GradEngine  # what LocalGradients runs: ghost, or a torch.func engine


@dataclass(frozen=True)
class StepGradients:
    """One step's forget loss and gradient ``g`` (per parameter), and the retain span probed with ``g``."""

    forget_loss: float
    forget_grad: dict[str, torch.Tensor]
    span: RetainSpan


class GradientSource(Protocol):
    """Turns a forget batch and a retain batch into ``StepGradients``; ``engine`` names the per-sample engine that
    ran last (see the module docstring)."""

    @property
    def engine(self) -> str: ...

    def compute(self, forget_batch: Any, retain_batch: Any) -> StepGradients: ...


def choose_engine(config: OrthoGradConfig, model: nn.Module, params: Iterable[str]) -> ChosenEngine:
    """"ghost" when the config and every trainable layer allow it, else the torch.func engine the config names
    ("vmap_or_loop" for the config's "auto")."""
    named = config.engine
    if named != "auto" and named != "ghost":  # a torch.func engine, as named
        return named
    if config.retain_grads == "mean":  # no per-sample gradients at all
        return "vmap_or_loop"
    if config.projection == "qr" or config.projection_scope == "per_tensor":
        reason: str | None = "projection='qr' or projection_scope='per_tensor' asks for the reference path"
    else:
        reason = unsupported_reason(model, list(params))
    if reason is None:
        log.info("OrthoGrad per-sample engine: ghost")
        return "ghost"
    if config.engine == "ghost":
        raise ValueError(f"engine='ghost' cannot handle this model ({reason}); use engine='auto' or 'vmap'")
    log.info("OrthoGrad per-sample engine: torch.func (%s)", reason)
    return "vmap_or_loop"


@dataclass(eq=False)
class LocalGradients:
    """The single-process source over ``params`` (trainable parameters by name). ``chosen`` is the engine it runs,
    from ``choose_engine`` ("ghost", or a torch.func engine for ``per_sample_grads_losses_and_engine``); ``engine``
    the one that ran last."""

    config: OrthoGradConfig
    context: MethodContext
    params: dict[str, nn.Parameter]
    chosen: ChosenEngine
    engine: str = field(init=False)
    row_bytes: float | None = field(init=False, default=None)  # bytes the last ghost pass captured per sample
    _plan: GhostPlan | None = field(init=False, default=None)  # the ghost engine's layers, checked once

    def __post_init__(self) -> None:
        self.engine = self.chosen

    def compute(self, forget_batch: Any, retain_batch: Any) -> StepGradients:
        grads = None
        if self.chosen == "ghost" and self.fusing(forget_batch):
            grads = self._fused(forget_batch, retain_batch)
        if grads is None:
            forget_loss, forget_grad = self.mean_gradient(forget_batch)
            span = self._retain_span(retain_batch, probe=forget_grad)
            grads = StepGradients(forget_loss=float(forget_loss.detach()), forget_grad=forget_grad, span=span)
        if isinstance(grads.span, GhostSpan):
            self.row_bytes = grads.span.row_bytes
        return grads

    def fusing(self, forget_batch: Any) -> bool:
        """Whether this step tries one ghost pass for both batches (see the module docstring)."""
        setting = self.config.fuse_passes
        if setting != "auto":
            return bool(setting)
        if self.config.chunk_size is not None or self.row_bytes is None:
            return False
        extra = ACTIVATIONS_PER_CAPTURE * self.row_bytes * batch_size_of(forget_batch)
        return fits(extra, self.context.device)

    def mean_gradient(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean loss of ``batch`` and its gradient (the forget gradient; the retain row of ``"mean"`` mode)."""
        with self._autocast():
            loss = self.context.task.mean_loss(self.context.model, batch)
        return loss, dict(zip(self.params, torch.autograd.grad(loss, list(self.params.values())), strict=True))

    def per_sample(self, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample gradients ``{name: [k, *shape]}`` and losses of ``batch``, from the torch.func engine."""
        engine = self.chosen
        assert engine != "ghost", "the torch.func path runs only once the ghost engine is set aside"
        with self._autocast():
            grads, losses, self.engine = per_sample_grads_losses_and_engine(
                self.context.model, self.context.task.per_sample_loss, batch, params=list(self.params),
                chunk_size=self.config.chunk_size, engine=engine,
            )
        return grads, losses

    def materialised(
        self, rows: dict[str, torch.Tensor], probe: dict[str, torch.Tensor], *, retain_loss: float
    ) -> MaterialisedSpan:
        """A span of ``rows`` ([k, *shape] per parameter) with the config's projection solver and scope."""
        return MaterialisedSpan(
            rows, probe, retain_loss=retain_loss, projection=self.config.projection, scope=self.config.projection_scope
        )

    def _fused(self, forget_batch: Any, retain_batch: Any) -> StepGradients | None:
        """Both batches in one ghost pass (``ghost_span_and_mean``) where that is exact: the task's mean loss must be
        the mean of its per-sample losses. None when they need separate passes (or the ghost engine refused)."""
        task = self.context.task
        if not task.mean_is_mean_of_per_sample(forget_batch):
            return None
        found = self._ghost(lambda: ghost_span_and_mean(
            self.context.model, task.per_sample_loss, retain_batch, forget_batch, **self.ghost_options()
        ))
        if found is None:
            return None
        span, forget_loss, forget_grad = found
        return StepGradients(forget_loss=float(forget_loss), forget_grad=forget_grad, span=span)

    def _retain_span(self, batch: Any, *, probe: dict[str, torch.Tensor]) -> RetainSpan:
        if self.chosen == "ghost":
            span = self._ghost(lambda: ghost_span(
                self.context.model, self.context.task.per_sample_loss, batch, probe=probe, **self.ghost_options()
            ))
            if span is not None:
                return span
        if self.config.retain_grads == "mean":
            loss, mean = self.mean_gradient(batch)
            rows = {n: g.unsqueeze(0) for n, g in mean.items()}
            return self.materialised(rows, probe, retain_loss=float(loss.detach()))
        per_sample, losses = self.per_sample(batch)
        return self.materialised(per_sample, probe, retain_loss=float(losses.mean()))

    def ghost_options(self) -> dict[str, Any]:
        """The keyword options of the ghost engine's calls (its layers, checked on the first call; chunk size,
        autocast dtype). Raises ``GhostUnsupportedError`` when a layer is unsupported."""
        if self._plan is None:
            self._plan = ghost_plan(self.context.model, list(self.params))
        return {
            "params": self._plan, "chunk_size": self.config.chunk_size,
            "autocast_dtype": torch.bfloat16 if self.config.bf16 else None,
        }

    def _ghost(self, run: Callable[[], _T]) -> _T | None:
        """``run()``; None when the ghost engine refuses at run time, which switches this source to torch.func for
        good (unless ``engine="ghost"`` was asked for: then the refusal is raised)."""
        try:
            return run()
        except GhostUnsupportedError as exc:
            if self.config.engine == "ghost":
                raise
            log.warning("ghost engine failed (%s); OrthoGrad continues with the torch.func engine", exc)
            self.chosen = "vmap_or_loop"
            return None

    def _autocast(self) -> AbstractContextManager[object]:
        if not self.config.bf16:
            return nullcontext()
        return torch.autocast(self.context.device.type, dtype=torch.bfloat16)
