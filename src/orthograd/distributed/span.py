"""The retain span of data-parallel OrthoGrad: row shards of ``G`` on the ranks, seen as the global ``G``.

Rank ``r`` holds ``G_r``, the per-sample retain gradients of its shard (rows ``offset .. offset + k_r`` of the global
``G``). ``G G^T`` and ``G g`` come from ``collectives.global_gram_and_product`` (all-to-all to column slices,
partial Gram per slice, all-reduce: the cross-rank blocks included), and ``mean(G)`` and ``G^T c`` from one
all-reduce of ``[1/k, c_r] @ G_r`` (``global_combination``). Every rank ends with the same values, so every rank
takes the same step. All of it is collective: every rank must build the span and call ``norms`` in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from orthograd.distributed.collectives import global_combination, global_gram_and_product, world
from orthograd.grads.span import ExplicitSpan, ExplicitTerms


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

    def _terms(self, coeffs: torch.Tensor) -> ExplicitTerms:
        rank, _ = world(self.group)
        k, offset = sum(self.counts), sum(self.counts[:rank])
        weights = torch.stack([torch.full_like(coeffs, 1.0 / k), coeffs])[:, offset : offset + self.counts[rank]]
        mean, projection = global_combination(self.local_rows, weights, group=self.group)
        residual = self.probe - projection
        return ExplicitTerms(
            retain_mean=unflatten(mean, self.shapes, dtype=self.dtype),
            residual=unflatten(residual, self.shapes, dtype=self.dtype),
        )


def unflatten(flat: torch.Tensor, shapes: dict[str, torch.Size], *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A flat ``[d]`` vector as ``dtype`` tensors of the given shapes, by name (in the order of ``shapes``)."""
    parts = torch.split(flat.to(dtype), [shape.numel() for shape in shapes.values()])
    return {name: part.view(shape) for (name, shape), part in zip(shapes.items(), parts)}
