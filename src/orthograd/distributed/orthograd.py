"""OrthoGrad on data-parallel ranks: the single-process update of the concatenated global batches, exactly.

Each rank computes, on its shard, the forget gradient and the per-sample retain gradients (torch.func engine).
Then, with ``R`` ranks and ``k`` global retain samples:

1. the forget gradient is the sample-weighted all-reduce of the shards' mean gradients (the global batch mean);
2. ``G G^T`` and ``G g_u`` come from ``collectives.global_gram_and_product`` (all-to-all to column slices,
   partial Gram per slice, all-reduce), so the cross-rank blocks are included;
3. every rank solves the same ``k x k`` system (``gram_coefficients``, float64, same cut-off as one process);
4. ``mean(G)`` and ``G^T c`` are one all-reduce of ``[1/k, c_r] @ G_r``.

Every rank ends with the same direction and takes the same optimizer step, so parameters stay identical with no
parameter broadcast after the first. Under DDP the projection is always the Gram solve (``projection="auto"``
means ``"gram"``: its QR fallback would need all of ``G`` on one rank) over all trainable parameters; the ghost
engine is single-process only (its layer-wise Gram cannot form the cross-rank blocks). ``retain_grads="mean"``
all-reduces the mean retain gradient and then projects exactly as one process does (any solver or scope).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from orthograd.distributed.collectives import (
    all_reduce_sum,
    gather_counts,
    global_combination,
    global_gram_and_product,
    world,
)
from orthograd.geometry import default_rcond, gram_coefficients, project_out
from orthograd.grads import batch_size_of, per_sample_grads_and_losses
from orthograd.methods.base import MethodContext
from orthograd.methods.orthograd import OrthoGrad, OrthoGradConfig


class DistributedOrthoGrad(OrthoGrad):
    """``OrthoGrad`` whose batches are this rank's shards and whose update is that of the global batches."""

    def __init__(
        self, config: OrthoGradConfig, context: MethodContext, *, group: dist.ProcessGroup | None = None
    ) -> None:
        _check_supported(config)
        self.group = group
        world(group)  # a clear error when no process group is initialised
        super().__init__(config, context)

    def _choose_engine(self) -> str:
        """The torch.func engine the config names ("auto" tries vmap, then the exact loop)."""
        return "auto" if self.config.engine == "auto" else self.config.engine

    def _weighted_mean(self, local_mean: torch.Tensor, count: int, total: int) -> torch.Tensor:
        """The global mean from this rank's mean over ``count`` of ``total`` samples (float64)."""
        return all_reduce_sum(local_mean.detach().double() * count, group=self.group) / total

    def update_direction(
        self, forget_batch: Any, retain_batch: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The single-process direction on the concatenation of every rank's ``forget_batch`` and ``retain_batch``."""
        cfg: OrthoGradConfig = self.config
        task, model = self.context.task, self.context.model
        names, params = list(self.params), list(self.params.values())
        device = params[0].device
        forget_counts = gather_counts(batch_size_of(forget_batch), device=device, group=self.group)
        rank, _ = world(self.group)
        n_forget, n_total = forget_counts[rank], sum(forget_counts)
        with self._autocast():
            local_forget_loss = task.mean_loss(model, forget_batch)
        local_grad = _flatten(torch.autograd.grad(local_forget_loss, params))
        forget_flat = self._weighted_mean(local_grad, n_forget, n_total)
        forget_loss = self._weighted_mean(local_forget_loss, n_forget, n_total)
        dtype = params[0].dtype
        forget_grad = _unflatten(forget_flat.to(dtype), self.params)
        if cfg.retain_grads == "mean":
            return self._mean_mode_direction(forget_loss, forget_grad, retain_batch)
        with self._autocast():
            per_sample, losses = per_sample_grads_and_losses(
                model, task.per_sample_loss, retain_batch, params=names, chunk_size=cfg.chunk_size, engine=self.engine
            )
        local_rows = torch.cat([per_sample[n].reshape(per_sample[n].shape[0], -1) for n in names], dim=1)
        counts = gather_counts(local_rows.shape[0], device=device, group=self.group)
        k, offset = sum(counts), sum(counts[:rank])
        retain_loss = float(all_reduce_sum(losses.double().sum(), group=self.group)) / k
        gram, product = global_gram_and_product(local_rows, forget_flat, counts=counts, group=self.group)
        if not (bool(torch.isfinite(forget_flat).all()) and bool(torch.isfinite(gram).all())):
            return {}, {"forget_loss": float(forget_loss), "retain_loss": retain_loss, "finite_grads": math.nan}
        coeffs = gram_coefficients(gram, product, rcond=default_rcond(dtype))
        weights = torch.stack([torch.full_like(coeffs, 1.0 / k), coeffs])[:, offset : offset + counts[rank]]
        mean_and_projection = global_combination(local_rows, weights, group=self.group)
        retain_mean = _unflatten(mean_and_projection[0].to(dtype), self.params)
        orthogonal = _unflatten((forget_flat - mean_and_projection[1]).to(dtype), self.params)
        return self._combine(forget_loss, forget_grad, retain_mean, orthogonal, retain_loss)

    def _mean_mode_direction(
        self, forget_loss: torch.Tensor, forget_grad: dict[str, torch.Tensor], retain_batch: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The "OrthoGrad Mean" ablation: project against the global mean retain gradient."""
        cfg: OrthoGradConfig = self.config
        params = list(self.params.values())
        counts = gather_counts(batch_size_of(retain_batch), device=params[0].device, group=self.group)
        rank, _ = world(self.group)
        with self._autocast():
            local_loss = self.context.task.mean_loss(self.context.model, retain_batch)
        local_grad = _flatten(torch.autograd.grad(local_loss, params))
        mean_flat = self._weighted_mean(local_grad, counts[rank], sum(counts))
        retain_loss = float(self._weighted_mean(local_loss, counts[rank], sum(counts)))
        if not all(bool(torch.isfinite(t).all()) for t in (mean_flat, *forget_grad.values())):
            return {}, {"forget_loss": float(forget_loss), "retain_loss": retain_loss, "finite_grads": math.nan}
        retain_mean = _unflatten(mean_flat.to(params[0].dtype), self.params)
        span = {n: g.unsqueeze(0) for n, g in retain_mean.items()}
        orthogonal = project_out(forget_grad, span, method=cfg.projection, scope=cfg.projection_scope)
        return self._combine(forget_loss, forget_grad, retain_mean, orthogonal, retain_loss)


def _check_supported(config: OrthoGradConfig) -> None:
    if config.schedule != "fixed":
        raise ValueError(
            "data-parallel OrthoGrad runs the fixed schedule only (the adaptive controller and its held-out retain "
            "slice are single-process): pass schedule='fixed' (or method 'orthograd-fixed'), or run single-process"
        )
    if config.retain_grads == "mean":
        return
    if config.projection == "qr" or config.projection_scope == "per_tensor":
        raise ValueError(
            "data-parallel OrthoGrad solves the global Gram system over all trainable parameters; projection='qr' "
            "and projection_scope='per_tensor' need every per-sample gradient on one rank: run them single-process, "
            "or use projection='auto' / 'gram' with projection_scope='global'"
        )
    if config.engine == "ghost":
        raise ValueError(
            "engine='ghost' is single-process only (its layer-wise Gram cannot form the cross-rank blocks); use "
            "engine='auto', 'vmap' or 'loop' for data-parallel runs"
        )


def _flatten(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(flat: torch.Tensor, like: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    parts = torch.split(flat, [p.numel() for p in like.values()])
    return {name: part.view_as(p) for (name, p), part in zip(like.items(), parts)}
