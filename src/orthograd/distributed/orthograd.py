"""OrthoGrad on data-parallel ranks: the single-process update of the concatenated global batches, exactly.

The method is OrthoGrad itself with another gradient source (``DataParallelGradients``); the direction is the
single-process one (``methods/direction.py``: same guard, same float64 solve and cut-off, same combine). Each rank
computes, on its shard, the forget gradient and the per-sample retain gradients (torch.func engine); then, with
``k`` global retain samples:

1. the forget gradient is the sample-weighted all-reduce of the shards' mean gradients (the global batch mean);
2. the retain span is a ``DataParallelSpan`` (``distributed/span.py``): ``G G^T`` and ``G g_u`` with the cross-rank
   blocks, and ``mean(G)`` and ``G^T c`` from one all-reduce;
3. every rank solves the same ``k x k`` system and takes the same optimizer step, so parameters stay identical with
   no parameter broadcast after the first.

``require_data_parallel`` names what cannot run this way: the adaptive schedule (its controller and held-out
retain slice are single-process), ``projection="qr"`` and ``projection_scope="per_tensor"`` (they need all of ``G``
on one rank; ``projection="auto"`` means the Gram solve here), and the ghost engine (its layer-wise Gram cannot form
the cross-rank blocks). ``retain_grads="mean"`` all-reduces the mean retain gradient and then projects exactly as
one process does (any solver or scope).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from orthograd.distributed.collectives import all_reduce_sum, gather_counts, world
from orthograd.distributed.span import DataParallelSpan, unflatten
from orthograd.grads import batch_size_of
from orthograd.methods.base import MethodContext
from orthograd.methods.orthograd import OrthoGrad, OrthoGradConfig
from orthograd.methods.orthograd_gradients import LocalGradients, SpanMethod, SpanSettings, StepGradients
from orthograd.grads.span import RetainSpan

log = logging.getLogger(__name__)


def require_data_parallel(config: SpanSettings) -> None:
    """Raise ValueError, with the fix, for an OrthoGrad setting that cannot give the global update on shards."""
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


def use_global_batches(method: SpanMethod, *, group: dist.ProcessGroup | None = None) -> None:
    """Give ``method`` the data-parallel source: its updates become those of the global batches over ``group``."""
    require_data_parallel(method.config)
    if not isinstance(method.gradients, LocalGradients):
        raise TypeError(f"expected a single-process gradient source, got {type(method.gradients).__name__}")
    method.gradients = DataParallelGradients(method.gradients, group=group)


class DataParallelGradients:
    """The gradient source of a data-parallel rank: its shards' gradients, reduced to the global batches'.

    ``local`` computes this rank's gradients (with its torch.func engine: "vmap_or_loop" tries vmap, then the exact
    loop).
    """

    def __init__(self, local: LocalGradients, *, group: dist.ProcessGroup | None = None) -> None:
        world(group)  # a clear error when no process group is initialised
        engine = "vmap_or_loop" if local.config.engine in ("auto", "ghost") else local.config.engine
        self.local = dataclasses.replace(local, chosen=engine)
        self.group = group
        self.shapes = {name: p.shape for name, p in local.params.items()}
        self.dtype = next(iter(local.params.values())).dtype
        log.info("data-parallel OrthoGrad: torch.func engine %r on every rank's shard", engine)

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
            span = self._sharded_span(retain_batch, probe=forget_flat)
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

    def _sharded_span(self, batch: Any, *, probe: torch.Tensor) -> RetainSpan:
        """This rank's per-sample retain gradients as rows of the global span, probed with the flat float64 ``g``."""
        per_sample, losses = self.local.per_sample(batch)
        rows = torch.cat([per_sample[n].reshape(per_sample[n].shape[0], -1) for n in self.shapes], dim=1)
        counts = gather_counts(rows.shape[0], device=rows.device, group=self.group)
        retain_loss = float(all_reduce_sum(losses.double().sum(), group=self.group)) / sum(counts)
        return DataParallelSpan(
            rows, probe, counts=counts, shapes=self.shapes, dtype=self.dtype, retain_loss=retain_loss, group=self.group
        )


class DistributedOrthoGrad(OrthoGrad):
    """``OrthoGrad`` whose batches are this rank's shards and whose update is that of the global batches.

    ``unlearn_distributed`` builds ``OrthoGrad`` (or any ``SpanMethod``) and calls ``use_global_batches`` itself;
    this class is that, for a caller composing the pieces by hand.
    """

    def __init__(
        self, config: OrthoGradConfig, context: MethodContext, *, group: dist.ProcessGroup | None = None
    ) -> None:
        require_data_parallel(config)
        world(group)  # a clear error when no process group is initialised, before any work
        super().__init__(config, context)
        use_global_batches(self, group=group)
