"""The ghost engine on data-parallel ranks: the global k x k Gram system from every rank's per-layer pieces.

Rank ``r`` runs the ghost pass on its shard (``grads.ghost.ghost_span``): per trainable parameter, the pieces of its
``k_r`` per-sample gradients (a linear or convolution weight's factors, layer input and output gradient, when that
form is the cheaper one; materialised per-sample gradients for small parameters and where they are smaller), and
from them its diagonal block ``G_r G_r^T`` and ``G_r g``. The blocks between ranks need both ranks' pieces:

* each unordered pair of ranks ``{r, s}`` is formed by one of them (``pair_owner``: balanced, every rank forms about
  half of its pairs), which receives the other's pieces and computes ``G_r G_s^T`` per parameter from the two
  ranks' pieces, in factored form where both have it (``Piece.gram``); the pieces travel as they are, so no rank
  materialises ``G`` where the ghost form is cheaper. A rank's pieces are broadcast when some other rank needs
  them, one rank at a time (memory: a rank's own pieces plus one other rank's);
* where a parameter's pieces are materialised on one rank and factored on another (sequence lengths differ
  between shards), every rank sends that parameter materialised, so both sides of a block have the same form;
* one all-reduce sums the blocks into ``G G^T`` and ``G g`` on every rank; every rank solves the same k x k system;
* ``G^T w`` is each rank's own contraction with its slice of ``w``, summed by one all-reduce (like DDP's gradient
  sync), and the norms come from the k x k system, as in one process.

All functions are collective: every rank of ``group`` calls them in the same order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from orthograd.distributed.collectives import all_reduce_sum, gather_counts, world
from orthograd.grads.ghost import GhostSpan
from orthograd.grads.ghost_layers import _Transposed
from orthograd.grads.ghost_math import Dense, Lookup, Outer, Piece

Chunks = list[tuple[int, Piece]]  # (first row within the rank's shard, piece) per chunk of samples
_FORMS = ("outer", "dense", "lookup")  # a parameter's form on the wire; a higher code wins a disagreement


@dataclass
class DataParallelGhostSpan(GhostSpan):
    """A ``GhostSpan`` whose ``gram`` and ``product`` are the global batch's and whose pieces are this rank's rows
    ``offset .. offset + rows`` of ``G``; ``combine`` sums every rank's contraction. ``global_loss``: the global
    batch's mean retain loss."""

    offset: int = 0
    rows: int = 0
    global_loss: float = 0.0
    group: dist.ProcessGroup | None = None

    @property
    def retain_loss(self) -> float:
        return self.global_loss

    def combine(self, weights: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """``weights @ G`` for ``[m, k]`` weights over the global rows: this rank's share, all-reduced."""
        local = super().combine(weights[:, self.offset : self.offset + self.rows])
        names = list(local[0])
        flat = torch.cat([row[name].reshape(-1) for row in local for name in names])
        total = all_reduce_sum(flat, group=self.group)
        sizes = [row[name].numel() for row in local for name in names]
        parts = iter(torch.split(total, sizes))
        return [{name: next(parts).view_as(row[name]) for name in names} for row in local]


def data_parallel_ghost_span(
    local: GhostSpan, *, group: dist.ProcessGroup | None = None
) -> DataParallelGhostSpan:
    """The global span of every rank's ``local`` ghost span (each probed with the same global forget gradient)."""
    rank, size = world(group)
    assert local.pieces is not None
    device = local.gram.device
    counts = gather_counts(local.gram.shape[0], device=device, group=group)
    offsets = [sum(counts[:r]) for r in range(size + 1)]
    k, own = offsets[-1], slice(offsets[rank], offsets[rank + 1])
    forms = _agreed_forms(local.pieces, device=device, group=group)
    mine = {name: [(start, _in_form(piece, forms[name])) for start, piece in chunks]
            for name, chunks in local.pieces.items()}
    system = torch.zeros(k, k + 1, dtype=torch.float64, device=device)  # [G G^T | G g]
    system[own, own] = local.gram
    system[own, k] = local.product
    for source in range(size):
        wanted = any(pair_owner(source, other) == other for other in range(size) if other != source)
        if not wanted:
            continue
        theirs = _broadcast_pieces(mine if rank == source else None, like=mine, source=source, group=group)
        if rank != source and pair_owner(rank, source) == rank:
            block = _cross_gram(mine, theirs, rows=counts[rank], cols=counts[source])
            cols = slice(offsets[source], offsets[source + 1])
            system[own, cols] += block
            system[cols, own] += block.T
        del theirs
    dist.all_reduce(system, op=dist.ReduceOp.SUM, group=group)
    losses = all_reduce_sum(local.losses.double().sum(), group=group)
    return DataParallelGhostSpan(
        gram=system[:, :k], product=system[:, k], losses=local.losses, pieces=local.pieces,
        offset=offsets[rank], rows=counts[rank], global_loss=float(losses) / k, group=group,
    )


def pair_owner(r: int, s: int) -> int:
    """The rank that forms the block between ranks ``r`` and ``s``: the lower one when their sum is odd, else the
    higher one (each rank owns about half of its pairs)."""
    low, high = min(r, s), max(r, s)
    return low if (low + high) % 2 else high


def _bare(piece: Piece) -> Piece:
    """The piece without the transposed-storage wrapper (a Gram block does not depend on the storage order)."""
    return piece.inner if isinstance(piece, _Transposed) else piece


def _form(piece: Piece) -> str:
    bare = _bare(piece)
    if isinstance(bare, Outer):
        return "outer"
    if isinstance(bare, Dense):
        return "dense"
    if isinstance(bare, Lookup):
        return "lookup"
    raise TypeError(f"data-parallel ghost pieces: no wire form for {type(bare).__name__}")


def _agreed_forms(
    pieces: Mapping[str, Chunks], *, device: torch.device, group: dist.ProcessGroup | None
) -> dict[str, str]:
    """Per parameter, the form every rank sends: factored where every rank's pieces are, else materialised."""
    codes = torch.tensor([max(_FORMS.index(_form(p)) for _, p in chunks) for chunks in pieces.values()],
                         dtype=torch.int64, device=device)
    dist.all_reduce(codes, op=dist.ReduceOp.MAX, group=group)
    return {name: _FORMS[code] for name, code in zip(pieces, codes.tolist(), strict=True)}


def _in_form(piece: Piece, form: str) -> Piece:
    """The bare piece in the agreed form: a factored piece materialised (``weights = I``) when the form is dense."""
    bare = _bare(piece)
    if form == "dense" and isinstance(bare, Outer):
        return Dense(bare.combine(torch.eye(bare.n, device=bare.grads.device)))
    return bare


def _tensors(piece: Piece) -> list[torch.Tensor]:
    """What a piece sends: the factors of a factored weight, the values of a materialised one, an embedding's
    indices and output gradients."""
    if isinstance(piece, Outer):
        return [piece.inputs, piece.grads]
    if isinstance(piece, Dense):
        return [piece.values]
    if isinstance(piece, Lookup):
        return [piece.index, piece.grads]
    raise TypeError(f"data-parallel ghost pieces: cannot send {type(piece).__name__}")


def _rebuilt(like: Piece, tensors: list[torch.Tensor]) -> Piece:
    """A received piece, from this rank's piece of the same parameter (same form; its layer's settings)."""
    if isinstance(like, Outer):
        return dataclasses.replace(like, inputs=tensors[0], grads=tensors[1])
    if isinstance(like, Dense):
        return Dense(tensors[0])
    if isinstance(like, Lookup):
        return Lookup(index=tensors[0], grads=tensors[1], num_rows=like.num_rows)
    raise TypeError(f"data-parallel ghost pieces: cannot rebuild {type(like).__name__}")


def _broadcast_pieces(
    pieces: Mapping[str, Chunks] | None,
    *,
    like: Mapping[str, Chunks],
    source: int,
    group: dist.ProcessGroup | None,
) -> dict[str, Chunks]:
    """``source``'s pieces on every rank: a header (chunk starts, tensor shapes and dtypes), then one flat buffer
    per dtype. ``like``: this rank's pieces in the same forms (the layers' settings for rebuilding)."""
    global_source = dist.get_global_rank(group, source) if group is not None else source
    header: list[Any] = [None]
    if pieces is not None:
        header[0] = {name: [(start, [(t.shape, t.dtype) for t in _tensors(p)]) for start, p in chunks]
                     for name, chunks in pieces.items()}
    dist.broadcast_object_list(header, src=global_source, group=group)
    layout: dict[str, list[tuple[int, list[tuple[torch.Size, torch.dtype]]]]] = header[0]
    device = _tensors(next(iter(like.values()))[0][1])[0].device
    sent = None if pieces is None else [t for chunks in pieces.values() for _, p in chunks for t in _tensors(p)]
    specs = [spec for chunks in layout.values() for _, tensors in chunks for spec in tensors]
    received = _broadcast_tensors(sent, specs, device=device, source=global_source, group=group)
    out: dict[str, Chunks] = {}
    for name, chunks in layout.items():
        template = like[name][0][1]
        out[name] = []
        for start, tensors in chunks:
            out[name].append((start, _rebuilt(template, [next(received) for _ in tensors])))
    return out


def _cross_gram(mine: Mapping[str, Chunks], theirs: Mapping[str, Chunks], *, rows: int, cols: int) -> torch.Tensor:
    """``G_mine G_theirs^T`` ([rows, cols], float64): the sum over parameters and chunk pairs of the pieces' blocks."""
    device = _tensors(next(iter(mine.values()))[0][1])[0].device
    block = torch.zeros(rows, cols, dtype=torch.float64, device=device)
    for name, chunks in mine.items():
        for start_i, piece_i in chunks:
            for start_j, piece_j in theirs[name]:
                block[start_i : start_i + piece_i.n, start_j : start_j + piece_j.n] += piece_i.gram(piece_j)
    return block


def _broadcast_tensors(
    sent: list[torch.Tensor] | None,
    specs: list[tuple[torch.Size, torch.dtype]],
    *,
    device: torch.device,
    source: int,
    group: dist.ProcessGroup | None,
) -> Iterator[torch.Tensor]:
    """The tensors of ``specs`` in order (``sent`` on the source, None elsewhere), one broadcast per dtype."""
    buffers = {}
    for dtype in dict.fromkeys(dtype for _, dtype in specs):
        sizes = [shape.numel() for shape, d in specs if d == dtype]
        if sent is not None:
            flat = torch.cat([t.detach().reshape(-1) for t in sent if t.dtype == dtype])
        else:
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        dist.broadcast(flat, src=source, group=group)
        buffers[dtype] = iter(torch.split(flat, sizes))
    return iter([next(buffers[dtype]).view(shape) for shape, dtype in specs])
