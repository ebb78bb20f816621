"""OrthoGrad on data-parallel ranks: the single-process update of the concatenated global batches, exactly.

The method is OrthoGrad itself with another gradient source (``DataParallelGradients``); the direction is the
single-process one (``methods/orthograd/direction.py``: same guard, same float64 solve and cut-off, same combine),
and the schedule is too (the adaptive controller decides on measurements every rank shares: ``ShardedContext``).
Each rank computes, on its shard, the forget gradient and its per-sample retain pieces; then, with ``k`` global
retain samples:

1. the forget gradient is the sample-weighted all-reduce of the shards' mean gradients (the global batch mean);
2. the retain span holds the global ``G G^T`` and ``G g_u`` with the cross-rank blocks: from every rank's ghost
   pieces (``distributed/ghost.py``, the engine ``choose_engine`` picks when every layer allows it: ``G`` is never
   formed where the ghost form is cheaper), else from torch.func's per-sample rows (``DataParallelSpan``: rank ``r``
   holds ``G_r``, rows ``offset .. offset + k_r`` of the global ``G``; ``G G^T`` and ``G g`` come from
   ``collectives.global_gram_and_product``, ``mean(G)`` and ``G^T c`` from one all-reduce of ``[1/k, c_r] @ G_r``);
3. every rank solves the same ``k x k`` system and takes the same optimizer step, so parameters stay identical with
   no parameter broadcast after the first.

``require_data_parallel`` names what cannot run this way: ``projection="qr"`` and ``projection_scope="per_tensor"``
(they need all of ``G`` on one rank; ``projection="auto"`` means the Gram solve here). ``fuse_passes`` does not
apply (the forget batch's gradient is all-reduced before it probes the span). ``retain_grads="mean"`` all-reduces
the mean retain gradient and then projects exactly as one process does (any solver or scope).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
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
from orthograd.distributed.ghost import data_parallel_ghost_span
from orthograd.distributed.sharding import is_fsdp_sharded
from orthograd.grads import batch_size_of
from orthograd.grads.ghost import GhostUnsupportedError, ghost_span
from orthograd.methods.orthograd.config import OrthoGradConfig
from orthograd.methods.orthograd.gradients import LocalGradients, StepGradients
from orthograd.methods.orthograd.method import OrthoGrad
from orthograd.methods.orthograd.span import ExplicitSpan, RetainSpan, Terms

log = logging.getLogger(__name__)


def require_data_parallel(config: OrthoGradConfig) -> None:
    """Raise ValueError, with the fix, for an OrthoGrad setting that cannot give the global update on shards."""
    if config.retain_grads == "mean":
        return
    if config.projection == "qr" or config.projection_scope == "per_tensor":
        raise ValueError(
            "data-parallel OrthoGrad solves the global Gram system over all trainable parameters; projection='qr' "
            "and projection_scope='per_tensor' need every per-sample gradient on one rank: run them single-process, "
            "or use projection='auto' / 'gram' with projection_scope='global'"
        )


def use_global_batches(method: OrthoGrad, *, group: dist.ProcessGroup | None = None) -> None:
    """Give ``method`` the data-parallel source: its updates become those of the global batches over ``group``."""
    require_data_parallel(method.config)
    if not isinstance(method.gradients, LocalGradients):
        raise TypeError(f"expected a single-process gradient source, got {type(method.gradients).__name__}")
    method.gradients = DataParallelGradients(method.gradients, group=group)


class DataParallelGradients:
    """The gradient source of a data-parallel rank: its shards' gradients, reduced to the global batches'.

    ``local`` computes this rank's gradients with the engine it chose: the ghost engine (a refusal at run time on
    any rank switches every rank to torch.func for good, unless ``engine="ghost"`` was asked for), or torch.func.
    """

    def __init__(self, local: LocalGradients, *, group: dist.ProcessGroup | None = None) -> None:
        world(group)  # a clear error when no process group is initialised
        if is_fsdp_sharded(local.context.model) and local.chosen != "ghost" and local.config.retain_grads != "mean":
            raise ValueError(
                f"a model sharded by FSDP needs the ghost engine (torch.func cannot run its collective forward per "
                f"sample), but engine {local.chosen!r} was chosen: train LoRA on linear layers, or pass engine='ghost' "
                "to see why a layer refuses it"
            )
        self.local = local
        self.group = group
        self.shapes = {name: p.shape for name, p in local.params.items()}
        self.dtype = next(iter(local.params.values())).dtype
        log.info("data-parallel OrthoGrad: engine %r on every rank's shard", local.chosen)

    @property
    def engine(self) -> str:
        return self.local.engine

    def compute(self, forget_batch: Any, retain_batch: Any) -> StepGradients:
        """The forget loss, gradient and retain span of the concatenation of every rank's batches."""
        local_loss, local_grad = self.local.mean_gradient(forget_batch)
        forget_loss, forget_flat = self._global_mean(forget_batch, local_loss, local_grad.values())
        forget_grad = unflatten(forget_flat, self.shapes, dtype=self.dtype)
        if self.local.config.retain_grads == "mean":
            span = self._mean_span(retain_batch, probe=forget_grad)
        else:
            ghost = self._ghost_span(retain_batch, probe=forget_grad) if self.local.chosen == "ghost" else None
            span = ghost if ghost is not None else self._sharded_span(retain_batch, probe=forget_flat)
        return StepGradients(forget_loss=forget_loss, forget_grad=forget_grad, span=span)

    def _global_mean(
        self, batch: Any, local_loss: torch.Tensor, local_grad: Iterable[torch.Tensor]
    ) -> tuple[float, torch.Tensor]:
        """The global batch's mean loss and flat float64 gradient from this rank's means (weighted by shard size)."""
        counts = gather_counts(batch_size_of(batch), device=local_loss.device, group=self.group)
        rank, _ = world(self.group)
        flat = torch.cat([g.reshape(-1) for g in local_grad])
        grad = all_reduce_sum(flat.detach().double() * counts[rank], group=self.group) / sum(counts)
        loss = all_reduce_sum(local_loss.detach().double() * counts[rank], group=self.group) / sum(counts)
        return float(loss), grad

    def _mean_span(self, batch: Any, *, probe: dict[str, torch.Tensor]) -> RetainSpan:
        """``retain_grads="mean"``: one row, the global mean retain gradient, projected as one process does."""
        local_loss, local_grad = self.local.mean_gradient(batch)
        retain_loss, mean_flat = self._global_mean(batch, local_loss, local_grad.values())
        row = {n: g.unsqueeze(0) for n, g in unflatten(mean_flat, self.shapes, dtype=self.dtype).items()}
        return self.local.materialised(row, probe, retain_loss=retain_loss)

    def _ghost_span(self, batch: Any, *, probe: dict[str, torch.Tensor]) -> RetainSpan | None:
        """The global span from every rank's ghost pieces; None when the ghost engine refused on some rank."""
        context = self.local.context
        sharded = is_fsdp_sharded(context.model)
        if sharded:
            _check_equal_chunk_counts(batch_size_of(batch), self.local.config.chunk_size, device=context.device,
                                      group=self.group)
        refusal: GhostUnsupportedError | None = None
        try:
            local = ghost_span(context.model, context.task.per_sample_loss, batch, probe=probe,
                               **self.local.ghost_options())
        except GhostUnsupportedError as exc:
            refusal = exc
        refused = torch.tensor([refusal is not None], dtype=torch.int32, device=context.device)
        dist.all_reduce(refused, op=dist.ReduceOp.MAX, group=self.group)
        if not bool(refused.item()):
            self.local.engine = "ghost"
            return data_parallel_ghost_span(local, group=self.group)
        reason = str(refusal) if refusal is not None else "another rank's ghost pass refused (see its log)"
        if sharded:
            raise GhostUnsupportedError(f"{reason}; a model sharded by FSDP needs the ghost engine (torch.func "
                                        "cannot run its collective forward per sample): train LoRA on linear layers")
        if self.local.config.engine == "ghost":
            raise GhostUnsupportedError(reason)
        log.warning("ghost engine failed (%s); data-parallel OrthoGrad continues with torch.func", reason)
        self.local.chosen = "vmap_or_loop"
        return None

    def _sharded_span(self, batch: Any, *, probe: torch.Tensor) -> RetainSpan:
        """This rank's per-sample retain gradients as rows of the global span, probed with the flat float64 ``g``."""
        per_sample, losses = self.local.per_sample(batch)
        rows = torch.cat([per_sample[n].reshape(per_sample[n].shape[0], -1) for n in self.shapes], dim=1)
        counts = gather_counts(rows.shape[0], device=rows.device, group=self.group)
        retain_loss = float(all_reduce_sum(losses.double().sum(), group=self.group)) / sum(counts)
        return DataParallelSpan(
            rows, probe, counts=counts, shapes=self.shapes, dtype=self.dtype, retain_loss=retain_loss, group=self.group
        )


def _check_equal_chunk_counts(
    rows: int, chunk_size: int | None, *, device: torch.device, group: dist.ProcessGroup | None
) -> None:
    """Under FSDP every forward is collective: every rank's ghost pass must run as many chunks as the others."""
    if chunk_size is None:
        return
    counts = gather_counts(rows, device=device, group=group)
    chunks = {-(-count // chunk_size) for count in counts}
    if len(chunks) > 1:
        raise ValueError(
            f"under FSDP every rank's retain shard must run the same number of chunks; shards of {counts} samples "
            f"in chunks of {chunk_size} do not: use chunk_size=None or a retain batch size whose shards agree"
        )


class DataParallelSpan(ExplicitSpan):
    """The global span of every rank's ``local_rows`` ([k_r, d], rank order) against the float64 ``probe`` ([d]).

    ``counts``: every rank's row count; ``shapes``: the parameters' names and shapes, in the column order of the
    rows (the terms come back per parameter, in ``dtype``); ``retain_loss``: the global batch's mean retain loss.
    """

    def __init__(
        self,
        local_rows: torch.Tensor,
        probe: torch.Tensor,
        *,
        counts: list[int],
        shapes: dict[str, torch.Size],
        dtype: torch.dtype,
        retain_loss: float,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.local_rows, self.probe, self.counts = local_rows, probe, counts
        self.shapes, self.dtype, self.group = shapes, dtype, group
        self.retain_loss = retain_loss
        self.gram, self.product = global_gram_and_product(local_rows, probe, counts=counts, group=group)

    def _terms(self, coeffs: torch.Tensor) -> Terms:
        rank, _ = world(self.group)
        k, offset = sum(self.counts), sum(self.counts[:rank])
        weights = torch.stack([torch.full_like(coeffs, 1.0 / k), coeffs])[:, offset : offset + self.counts[rank]]
        mean, projection = global_combination(self.local_rows, weights, group=self.group)
        residual = self.probe - projection
        return unflatten(mean, self.shapes, dtype=self.dtype), unflatten(residual, self.shapes, dtype=self.dtype)


def unflatten(flat: torch.Tensor, shapes: dict[str, torch.Size], *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A flat ``[d]`` vector as ``dtype`` tensors of the given shapes, by name (in the order of ``shapes``)."""
    parts = torch.split(flat.to(dtype), [shape.numel() for shape in shapes.values()])
    return {name: part.view(shape) for (name, shape), part in zip(shapes.items(), parts, strict=True)}
