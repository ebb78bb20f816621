"""OrthoGrad (Shamsian et al., "Go Beyond Your Means: Unlearning with Per-Sample Gradient Orthogonalization").

Algorithm 1 of the paper, one step:

1. g_u: gradient of the mean loss on a forget batch;
2. G_r = [g_r^1 .. g_r^k]: per-sample gradients of a retain batch;
3. g_u_perp = g_u minus its projection onto span(G_r) (QR in the paper; a Gram solve here by default, same result);
4. update direction g = alpha * mean(G_r) + (1 - alpha) * (-g_u_perp): descent on the retain loss, ascent on
   the forget loss along directions that leave every retain sample's loss unchanged to first order;
5. optimizer step on the trainable parameters (LoRA adapters by default), merged at the end by the runner.

The paper's ablations are options: ``retain_grads="mean"`` projects against the mean retain gradient only,
``lora=None`` trains all parameters, ``alpha=0`` is pure orthogonal ascent. ``projection_scope="per_tensor"`` is
the per-tensor projection of the code found online (see docs/design.md for why it is not the default).
Per-sample engine: ``engine="auto"`` uses the ghost engine (``grads/ghost.py``: k x k Gram blocks from layer inputs
and output gradients, never the [k, d] matrix; always the Gram solve) when every trainable parameter sits in a
supported layer, else torch.func. ``projection="qr"``, ``projection_scope="per_tensor"`` and ``retain_grads="mean"``
take the reference path (torch.func + ``project_out``). The choice is logged and recorded as ``engine_ghost``.
An epoch is one pass over the forget set; retain batches are drawn from a reshuffled cycle of the retain set.
BatchNorm layers run in eval mode throughout (per-sample gradients cannot update running statistics).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from orthograd.geometry import PROJECTION_METHODS, PROJECTION_SCOPES, default_rcond, gram_coefficients, project_out
from orthograd.grads import ENGINES, per_sample_grads_and_losses
from orthograd.grads.ghost import GhostUnsupportedError, ghost_span, unsupported_reason
from orthograd.methods.base import IterativeConfig, MethodConfig, MethodContext, UnlearningMethod, make_optimizer
from orthograd.methods.registry import register

RETAIN_GRAD_MODES: tuple[str, ...] = ("per_sample", "mean")
ORTHOGRAD_ENGINES: tuple[str, ...] = ("ghost", *ENGINES)

log = logging.getLogger(__name__)


@dataclass
class OrthoGradConfig(IterativeConfig):
    """OrthoGrad hyperparameters; defaults are the paper's image-classification choices (Appendix A.1).

    alpha: weight of the mean retain gradient (0.9 random, 0.8 class forgetting in the paper; 0.05-0.5 for ASR).
    retain_grads: "per_sample" (OrthoGrad) or "mean" (the "OrthoGrad Mean" ablation).
    projection: "auto" | "gram" | "qr" solver; projection_scope: "global" (Algorithm 1) or "per_tensor".
    chunk_size: samples per forward/backward chunk (bounds memory); engine: "auto" | "ghost" | "vmap" | "loop".
    bf16: run forward and backward under bfloat16 autocast (the projection solve stays float64).
    """

    alpha: float = 0.9
    lr: float = 1e-3
    retain_grads: Literal["per_sample", "mean"] = "per_sample"
    projection: Literal["auto", "qr", "gram"] = "auto"
    projection_scope: Literal["global", "per_tensor"] = "global"
    chunk_size: int | None = None
    engine: Literal["auto", "ghost", "vmap", "loop"] = "auto"
    bf16: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.alpha == 1.0:
            raise ValueError("alpha=1 ignores the forget set entirely (that is Finetune); use alpha < 1")
        if self.retain_grads not in RETAIN_GRAD_MODES:
            raise ValueError(f"retain_grads must be one of {RETAIN_GRAD_MODES}, got {self.retain_grads!r}")
        if self.projection not in PROJECTION_METHODS:
            raise ValueError(f"projection must be one of {PROJECTION_METHODS}, got {self.projection!r}")
        if self.projection_scope not in PROJECTION_SCOPES:
            raise ValueError(f"projection_scope must be one of {PROJECTION_SCOPES}, got {self.projection_scope!r}")
        if self.engine not in ORTHOGRAD_ENGINES:
            raise ValueError(f"engine must be one of {ORTHOGRAD_ENGINES}, got {self.engine!r}")
        if self.engine == "ghost" and (self.projection == "qr" or self.projection_scope == "per_tensor"):
            raise ValueError("engine='ghost' solves the global Gram system; use engine='vmap' for projection='qr' "
                             "or projection_scope='per_tensor'")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")


@register
class OrthoGrad(UnlearningMethod):
    """Forget-gradient ascent projected orthogonally to every per-sample retain gradient, plus alpha * retain
    descent."""

    name: ClassVar[str] = "orthograd"
    config_class: ClassVar[type[MethodConfig]] = OrthoGradConfig

    def __init__(self, config: OrthoGradConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        self.params = context.trainable_parameters()
        self.optimizer = make_optimizer(config, list(self.params.values()))
        self._retain = context.endless(context.loader("retain", batch_size=config.retain_batch_size))
        self.engine = self._choose_engine()

    def _choose_engine(self) -> str:
        """"ghost" when the config and every trainable layer allow it, else the torch.func engine named by the
        config."""
        cfg: OrthoGradConfig = self.config
        if cfg.engine in ENGINES and cfg.engine != "auto":
            return cfg.engine
        if cfg.retain_grads == "mean":  # no per-sample gradients at all
            return "auto"
        if cfg.projection == "qr" or cfg.projection_scope == "per_tensor":
            reason: str | None = "projection='qr' or projection_scope='per_tensor' asks for the reference path"
        else:
            reason = unsupported_reason(self.context.model, list(self.params))
        if reason is None:
            log.info("OrthoGrad per-sample engine: ghost")
            return "ghost"
        if cfg.engine == "ghost":
            raise ValueError(f"engine='ghost' cannot handle this model ({reason}); use engine='auto' or 'vmap'")
        log.info("OrthoGrad per-sample engine: torch.func (%s)", reason)
        return "auto"

    def _autocast(self) -> AbstractContextManager[object]:
        if not self.config.bf16:
            return nullcontext()
        return torch.autocast(self.context.device.type, dtype=torch.bfloat16)

    def run_epoch(self, epoch: int) -> Iterator[dict[str, float]]:
        forget_loader = self.context.loader("forget", batch_size=self.config.forget_batch_size)
        for forget_batch in self.context.batches(forget_loader):
            yield self.step(forget_batch, next(self._retain))

    def update_direction(
        self, forget_batch: Any, retain_batch: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The descent direction alpha * mean(G_r) - (1 - alpha) * g_u_perp, and step statistics."""
        cfg: OrthoGradConfig = self.config
        task, model, names = self.context.task, self.context.model, list(self.params)
        with self._autocast():
            forget_loss = task.mean_loss(model, forget_batch)
        forget_grad = dict(zip(names, torch.autograd.grad(forget_loss, list(self.params.values()))))
        if self.engine == "ghost":
            try:
                return self._ghost_direction(forget_loss, forget_grad, retain_batch)
            except GhostUnsupportedError as exc:
                if cfg.engine == "ghost":
                    raise
                log.warning("ghost engine failed (%s); OrthoGrad continues with the torch.func engine", exc)
                self.engine = "auto"
        if cfg.retain_grads == "per_sample":
            with self._autocast():
                per_sample, losses = per_sample_grads_and_losses(
                    model, task.per_sample_loss, retain_batch, params=names, chunk_size=cfg.chunk_size,
                    engine=self.engine,
                )
            retain_mean = {n: g.mean(dim=0) for n, g in per_sample.items()}
            retain_loss = float(losses.mean())
            span = per_sample
        else:
            with self._autocast():
                mean_loss = task.mean_loss(model, retain_batch)
            retain_mean = dict(zip(names, torch.autograd.grad(mean_loss, list(self.params.values()))))
            retain_loss = float(mean_loss.detach())
            span = {n: g.unsqueeze(0) for n, g in retain_mean.items()}
        if not (math.isfinite(_norm(forget_grad)) and math.isfinite(_norm(span))):
            return {}, {"forget_loss": float(forget_loss.detach()), "retain_loss": retain_loss,
                        "finite_grads": math.nan}
        orthogonal = project_out(forget_grad, span, method=cfg.projection, scope=cfg.projection_scope)
        return self._combine(forget_loss, forget_grad, retain_mean, orthogonal, retain_loss)

    def _ghost_direction(
        self, forget_loss: torch.Tensor, forget_grad: dict[str, torch.Tensor], retain_batch: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The update from the ghost engine: Gram solve on G G^T and G g_u, then G^T (1/k) and G^T c per layer."""
        cfg: OrthoGradConfig = self.config
        span = ghost_span(
            self.context.model,
            self.context.task.per_sample_loss,
            retain_batch,
            probe=forget_grad,
            params=list(self.params),
            chunk_size=cfg.chunk_size,
            autocast_dtype=torch.bfloat16 if cfg.bf16 else None,
        )
        retain_loss = float(span.losses.mean())
        span_norm = _norm({"gram": span.gram, "product": span.product})
        if not (math.isfinite(_norm(forget_grad)) and math.isfinite(span_norm)):
            return {}, {"forget_loss": float(forget_loss.detach()), "retain_loss": retain_loss,
                        "finite_grads": math.nan}
        dtype = next(iter(forget_grad.values())).dtype
        coeffs = gram_coefficients(span.gram, span.product, rcond=default_rcond(dtype))
        retain_mean, projection = span.combine(torch.stack([torch.full_like(coeffs, 1.0 / coeffs.numel()), coeffs]))
        orthogonal = {n: forget_grad[n] - projection[n].to(forget_grad[n].dtype) for n in forget_grad}
        return self._combine(forget_loss, forget_grad, retain_mean, orthogonal, retain_loss)

    def _combine(
        self,
        forget_loss: torch.Tensor,
        forget_grad: dict[str, torch.Tensor],
        retain_mean: dict[str, torch.Tensor],
        orthogonal: dict[str, torch.Tensor],
        retain_loss: float,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """alpha * mean(G_r) - (1 - alpha) * g_u_perp, and the step statistics."""
        alpha = self.config.alpha
        direction = {
            n: alpha * retain_mean[n].to(g.dtype) - (1.0 - alpha) * orthogonal[n] for n, g in forget_grad.items()
        }
        stats = {
            "forget_loss": float(forget_loss.detach()),
            "retain_loss": retain_loss,
            "kept_fraction": _norm(orthogonal) / max(_norm(forget_grad), 1e-30),
            "engine_ghost": float(self.engine == "ghost"),
        }
        return direction, stats

    def step(self, forget_batch: Any, retain_batch: Any) -> dict[str, float]:
        direction, stats = self.update_direction(forget_batch, retain_batch)
        if not direction:  # non-finite gradients: no update; the runner sees the NaN statistic and stops
            return stats
        for name, param in self.params.items():
            param.grad = direction[name].to(param.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    """Euclidean norm of all tensors together: a norm of per-tensor norms, with no float64 copy of the tensors.

    It is also the finiteness check: the norm is NaN or inf exactly when some entry is (or when it overflows).
    """
    norms = torch.stack([torch.linalg.vector_norm(t.detach()).double() for t in tensors.values()])
    return float(torch.linalg.vector_norm(norms))
