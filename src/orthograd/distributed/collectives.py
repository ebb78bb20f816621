"""Collectives for data-parallel OrthoGrad: the global Gram system from row shards of the per-sample gradients.

Rank ``r`` holds ``G_r`` ([k_r, d]), the per-sample retain gradients of its shard; the global ``G`` is the
concatenation of the ``G_r`` in rank order. OrthoGrad needs ``G G^T`` ([k, k]), ``G g`` and ``G^T w``:

* ``G^T w = sum_r G_r^T w_r`` is a local product and one all-reduce of a ``d``-vector (like DDP's gradient sync);
* ``G G^T`` has cross blocks ``G_r G_s^T`` that no rank can form from its own rows. An all-to-all turns the row
  shards into column shards (rank ``r`` receives every rank's rows of the ``r``-th slice of the ``d`` columns);
  each rank then forms the partial Gram of its slice, and an all-reduce sums the slices. Every rank holds about
  ``k d / R`` received entries, so memory per rank stays that of its own shard, and the ``k^2 d`` Gram work is split
  ``R`` ways. Gathering only each rank's local Gram block would miss the cross blocks and change the update.

All functions are collective: every rank of ``group`` must call them in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_COLUMN_CHUNK = 1 << 22  # columns upcast to float64 at a time (bounds the extra memory)


def world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (default: the whole job)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: launch with torchrun (see README 'Scaling out') or call "
            "torch.distributed.init_process_group first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_sum(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks (a new tensor; the input is left as it was)."""
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def gather_counts(count: int, *, device: torch.device, group: dist.ProcessGroup | None = None) -> list[int]:
    """Every rank's ``count`` (e.g. its number of samples), in rank order."""
    _, size = world(group)
    parts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(parts, torch.tensor([count], dtype=torch.int64, device=device), group=group)
    return [int(p.item()) for p in parts]


def global_gram_and_product(
    local_rows: torch.Tensor, probe: torch.Tensor, *, counts: list[int], group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G G^T, G probe)`` in float64 for the global ``G`` whose rows are every rank's ``local_rows`` in rank order.

    ``local_rows``: this rank's ``[counts[rank], d]``; ``probe``: a ``[d]`` vector equal on every rank;
    ``counts``: every rank's row count (``gather_counts``). Returns ``[k, k]`` and ``[k]`` with ``k = sum(counts)``,
    the same on every rank.
    """
    rank, size = world(group)
    if local_rows.dim() != 2 or local_rows.shape[0] != counts[rank] or probe.shape != local_rows.shape[1:]:
        raise ValueError(
            f"expected local rows [{counts[rank]}, d] and a probe [d]; got {tuple(local_rows.shape)} and "
            f"{tuple(probe.shape)}"
        )
    d = local_rows.shape[1]
    bounds = [d * s // size for s in range(size + 1)]
    widths = [bounds[s + 1] - bounds[s] for s in range(size)]
    width = widths[rank]
    outgoing = torch.cat([local_rows[:, bounds[s] : bounds[s + 1]].reshape(-1) for s in range(size)])
    incoming = local_rows.new_empty(sum(counts) * width)
    dist.all_to_all_single(  # flat buffers: gloo's list form needs equal shapes, shards may differ in size
        incoming,
        outgoing,
        output_split_sizes=[c * width for c in counts],
        input_split_sizes=[counts[rank] * w for w in widths],
        group=group,
    )
    columns = incoming.view(sum(counts), width)  # every sample's entries in this rank's column slice, rank order
    probe_slice = probe[bounds[rank] : bounds[rank + 1]]
    k = columns.shape[0]
    partial = torch.zeros(k, k + 1, dtype=torch.float64, device=local_rows.device)
    for start in range(0, width, _COLUMN_CHUNK):
        block = columns[:, start : start + _COLUMN_CHUNK].double()
        partial[:, :k] += block @ block.T
        partial[:, k] += block @ probe_slice[start : start + _COLUMN_CHUNK].double()
    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    return partial[:, :k], partial[:, k]


def global_combination(
    local_rows: torch.Tensor, weights: torch.Tensor, *, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """``weights @ G`` in float64 ([m, d]) from this rank's rows and its ``[m, k_r]`` columns of the weights."""
    if weights.dim() != 2 or weights.shape[1] != local_rows.shape[0]:
        raise ValueError(f"expected weights [m, {local_rows.shape[0]}], got {tuple(weights.shape)}")
    d = local_rows.shape[1]
    out = torch.zeros(weights.shape[0], d, dtype=torch.float64, device=local_rows.device)
    w = weights.double()
    for start in range(0, d, _COLUMN_CHUNK):
        out[:, start : start + _COLUMN_CHUNK] = w @ local_rows[:, start : start + _COLUMN_CHUNK].double()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
