"""Per-sample gradients of one parameter kept in factored form: Gram blocks, products and combinations.

A layer's per-sample gradient is a simple function of what the layer saw (its input) and what came back (the
gradient of the summed loss with respect to its output). These "pieces" answer the questions OrthoGrad asks
of the per-sample gradients ``G`` of one parameter for a block of samples, without forming ``G`` when that is cheaper:

* ``gram(other)``: the block ``G_self G_other^T`` (float64), the parameter's share of the k x k Gram matrix;
* ``dot(probe)``: ``G_self probe`` (float64) for a vector of the parameter's shape (the forget gradient);
* ``gram_and_dot(probe)``: both for ``other = self`` in one pass over the per-sample gradients;
* ``combine(weights)``: ``weights @ G_self`` for ``[m, n]`` weights, i.e. ``m`` weighted sums of per-sample grads.

``Outer`` covers Linear and Conv2d weights (a sum over positions of outer products ``b_t a_t^T``): the Gram block is
either the "ghost" inner product ``sum_{t,s} (a_t . a'_s)(b_t . b'_s)`` or the product of materialised per-sample
gradients, whichever costs fewer operations. ``Lookup`` covers Embedding weights, ``Dense`` everything small.
``ghost_grams`` sums the ghost Gram blocks of several ``Outer`` pieces of one shape in one batched product.
Working sets are bounded by ``workspace(device)`` elements (blocks of samples, or of weight rows, in turn).
Convolutions weight their per-sample gradients by the layer's own weight-gradient kernel (``Outer.contract``).

Precision: per-sample gradients and weighted sums are float32 (float64 for float64 models); Gram blocks and
products are accumulated in float64, because they feed the ill-conditioned k x k solve. A float32 Gram strays from
the float64 QR projection by up to 2e-5 on trained models' batches (k=256) and 6e-3 on near-duplicate samples,
where the float64 Gram stays within 1e-6 (``benchmarks/gram_precision.py``, tests/test_ghost_precision.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch

KERNEL_POSITIONS = 16  # fewer positions: one GEMM on the (small) rows beats a conv weight-gradient kernel (CPU)
WORKSPACE = 1 << 25  # elements of the largest temporary a piece builds at once (e.g. a block of per-sample grads)
CPU_WORKSPACE = 1 << 21  # on a CPU: float64 temporaries under glibc's 32 MiB mmap ceiling, reused, not page-faulted
CPU_CAST_BLOCK = 1 << 18  # on a CPU: elements of a float64 copy of float32 per-sample gradients made at once
_SUMMED_ONLY: ContextVar[bool] = ContextVar("summed_only", default=False)


class Piece(Protocol):
    """Per-sample gradients of one parameter for ``n`` samples, in whatever form is cheapest."""

    @property
    def n(self) -> int: ...

    def gram(self, other: Piece) -> torch.Tensor: ...

    def gram_and_dot(self, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def dot(self, probe: torch.Tensor) -> torch.Tensor: ...

    def combine(self, weights: torch.Tensor) -> torch.Tensor: ...


@contextmanager
def summed_only() -> Iterator[None]:
    """Pieces built within are only combined, never Gram-multiplied (e.g. summed into a mean gradient): an
    ``Outer`` then keeps its factors rather than materialising per-sample gradients in ``compact``."""
    token = _SUMMED_ONLY.set(True)
    try:
        yield
    finally:
        _SUMMED_ONLY.reset(token)


def _combine_dtype(t: torch.Tensor) -> torch.dtype:
    """Weighted sums are formed in float32 (float64 for float64 models): bf16 factors are upcast first."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def workspace(device: torch.device) -> int:
    """Elements a piece's temporaries may take at once on ``device``.

    On a CPU the bound is ``CPU_WORKSPACE``: a larger temporary is a fresh mmap whose every page faults on first
    touch (casting the 32 x 147k per-sample gradients of one ResNet18 conv to float64 took 20 ms, its Gram 15 ms),
    whereas blocks below glibc's mmap ceiling come from the heap, already mapped. GPUs (a caching allocator) take
    ``WORKSPACE``: fewer, larger kernels.
    """
    return min(WORKSPACE, CPU_WORKSPACE) if device.type == "cpu" else WORKSPACE


def cast_block(device: torch.device) -> int:
    """Elements of a float64 copy of working-precision per-sample gradients that a Gram product casts at once.

    On a CPU the bound is ``CPU_CAST_BLOCK`` (2 MiB of float64): the whole copy would take twice the memory of the
    float32 gradients it is cast from (SmallCNN's 64 x 4,608 convolution: 2.4 MB, a quarter of its step's peak),
    and a block the size of a core's L2 cache is multiplied while it is cached (ResNet18's 32 x 147k convolution
    gradients: 22 ms in such blocks, 25 ms copied whole). GPUs take ``workspace``: fewer, larger kernels.
    """
    return min(workspace(device), CPU_CAST_BLOCK) if device.type == "cpu" else workspace(device)


def _blocks(n: int, per_sample: int, device: torch.device, limit: int | None = None) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` whose working set (``per_sample`` elements each) fits ``limit`` elements
    (the workspace by default)."""
    step = max(1, (workspace(device) if limit is None else limit) // max(per_sample, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


@dataclass
class Dense:
    """Materialised per-sample gradients ``[n, *shape]`` (norm-layer affine parameters, biases)."""

    values: torch.Tensor

    @property
    def n(self) -> int:
        return self.values.shape[0]

    def gram(self, other: Piece) -> torch.Tensor:
        assert isinstance(other, Dense)
        return self.values.flatten(1).double() @ other.values.flatten(1).double().T

    def gram_and_dot(self, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.values.flatten(1).double()
        return values @ values.T, values @ probe.reshape(-1).double()

    def dot(self, probe: torch.Tensor) -> torch.Tensor:
        return self.values.flatten(1).double() @ probe.reshape(-1).double()

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        dtype = _combine_dtype(self.values)
        flat = weights.to(dtype) @ self.values.flatten(1).to(dtype)
        return flat.view(weights.shape[0], *self.values.shape[1:])


Contract = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Scratch:
    """Flat buffers, one per dtype, that a loop over blocks reuses: one allocation per loop instead of one per block
    (on a CPU each fresh large temporary is page-faulted in again, as glibc returns freed large blocks)."""

    def __init__(self) -> None:
        self._flat: dict[torch.dtype, torch.Tensor] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous ``shape`` view of the ``dtype`` buffer (grown when too small); its previous view is stale."""
        numel = math.prod(shape)
        flat = self._flat.get(dtype)
        if flat is None or flat.numel() < numel:
            flat = self._flat[dtype] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)


def _float64_columns(values: torch.Tensor, scratch: Scratch) -> Iterator[tuple[slice, torch.Tensor]]:
    """Blocks of columns of ``values`` (``[n, width]``) in float64, each cast into ``scratch`` (valid until the next
    block) and at most ``cast_block`` elements: the whole float64 copy never exists at once. Float64 values as they
    are."""
    if values.dtype == torch.float64:
        yield slice(None), values
        return
    n, device = values.shape[0], values.device
    for columns in _blocks(values.shape[1], n, device, cast_block(device)):
        part = values[:, columns]
        yield columns, scratch.take(tuple(part.shape), torch.float64, device).copy_(part)


@dataclass
class Outer:
    """A weight whose per-sample gradient is ``sum_t b[i, t] a[i, t]^T`` (shape ``[d_out, d_in]`` viewed as ``shape``).

    ``inputs`` is what the layer saw and ``rows(inputs[block]) -> [s, T, d_in]`` turns it into per-position rows
    (a reshape for Linear, an unfold for Conv2d); ``grads`` is ``[n, T, d_out]``. The rows are formed once per pass
    (Gram and ``G g`` together, or ``G^T w``) when they fit the workspace, else per block of samples.
    ``ghost`` picks the Gram method (decided from the layer's sizes by ``prefer_ghost``). ``contract(inputs, grads)``,
    when given, is the layer's own weight-gradient kernel (``sum_i`` of the per-sample gradients of ``grads`` in the
    ``[s, T, d_out]`` layout, as a ``[d_out, d_in]`` tensor); ``combine`` uses it, and no rows, from
    ``KERNEL_POSITIONS`` positions on.
    """

    inputs: torch.Tensor
    rows: Callable[[torch.Tensor], torch.Tensor]
    grads: torch.Tensor
    shape: torch.Size
    ghost: bool
    contract: Contract | None = None

    @property
    def n(self) -> int:
        return self.grads.shape[0]

    @property
    def positions(self) -> int:
        return self.grads.shape[1]

    @property
    def d_out(self) -> int:
        return self.grads.shape[2]

    @property
    def d_in(self) -> int:
        return self.shape.numel() // self.d_out

    def _unfolded(self) -> torch.Tensor | None:
        """All rows ``[n, T, d_in]`` in the working dtype when they fit the workspace, else None (form per block)."""
        if self.n * self.positions * self.d_in > workspace(self.grads.device):
            return None
        return self.rows(self.inputs).to(_combine_dtype(self.grads))

    def _a(self, block: slice, unfolded: torch.Tensor | None) -> torch.Tensor:
        if unfolded is not None:
            return unfolded[block]
        return self.rows(self.inputs[block]).to(_combine_dtype(self.grads))

    def _materialise(
        self, out_rows: slice, dtype: torch.dtype, unfolded: torch.Tensor | None, scratch: Scratch | None = None
    ) -> torch.Tensor:
        """Per-sample gradients ``[n, r * d_in]`` of the weight rows ``out_rows``, formed in the working precision
        (float32 as torch.func forms them; a float64 product is 3-7x slower on a CPU) and returned in ``dtype``;
        in ``scratch``'s memory when given (valid until the next call with it)."""
        work, rows = _combine_dtype(self.grads), out_rows.stop - out_rows.start
        b = self.grads[:, :, out_rows].to(work).transpose(1, 2)  # [n, r, T]
        if unfolded is not None and scratch is not None:
            values = torch.bmm(b, unfolded, out=scratch.take((self.n, rows, self.d_in), work, self.grads.device))
        elif unfolded is not None:
            values = torch.bmm(b, unfolded)
        else:
            blocks = _blocks(self.n, self.positions * self.d_in, self.grads.device)
            values = torch.cat([torch.bmm(b[block], self._a(block, None)) for block in blocks])
        flat = values.view(self.n, -1)
        if scratch is None or dtype == work:
            return flat.to(dtype)
        return scratch.take(tuple(flat.shape), dtype, self.grads.device).copy_(flat)

    def _row_chunks(self, n: int) -> Iterator[slice]:
        """Slices of the weight's output rows whose per-sample gradients for ``n`` samples fit the workspace."""
        return _blocks(self.d_out, n * self.d_in, self.grads.device)

    def compact(self) -> Piece:
        """``Dense`` per-sample gradients when the Gram method materialises them anyway and they are smaller than
        the stored factors (e.g. LoRA factors on long sequences), else ``self`` (always within ``summed_only``)."""
        if self.ghost or _SUMMED_ONLY.get() or self.n * self.shape.numel() > self.inputs.numel() + self.grads.numel():
            return self
        dtype, unfolded = _combine_dtype(self.grads), self._unfolded()
        chunks = [self._materialise(rows, dtype, unfolded) for rows in self._row_chunks(self.n)]
        return Dense(torch.cat([c.view(self.n, -1, self.d_in) for c in chunks], dim=1).view(self.n, *self.shape))

    def gram(self, other: Piece) -> torch.Tensor:
        assert isinstance(other, Outer)
        return self._gram(other, self._unfolded(), other._unfolded())

    def _gram(self, other: Outer, mine: torch.Tensor | None, theirs: torch.Tensor | None) -> torch.Tensor:
        out = torch.zeros(self.n, other.n, dtype=torch.float64, device=self.grads.device)
        if self.ghost:
            a2, b2 = other._a(slice(None), theirs).double().flatten(0, 1), other.grads.double().flatten(0, 1)
            for block in _blocks(self.n, self.positions * a2.shape[0], self.grads.device):
                a1, b1 = self._a(block, mine).double().flatten(0, 1), self.grads[block].double().flatten(0, 1)
                pair = (a1 @ a2.T) * (b1 @ b2.T)
                out[block] = pair.view(-1, self.positions, other.n, other.positions).sum(dim=(1, 3))
            return out
        for rows in self._row_chunks(max(self.n, other.n)):
            out += self._materialise(rows, torch.float64, mine) @ other._materialise(rows, torch.float64, theirs).T
        return out

    def gram_and_dot(self, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unfolded = self._unfolded()
        if self.ghost:
            return self._gram(self, unfolded, unfolded), self._dot(probe, unfolded)
        weight = probe.reshape(self.d_out, self.d_in)
        scratch = Scratch()
        gram, dot = None, None
        chunks = list(self._row_chunks(self.n))
        for rows in chunks:
            values = self._materialise(rows, _combine_dtype(self.grads), unfolded, scratch)
            if rows is chunks[-1]:
                unfolded = None  # not needed again: its memory is free before the float64 blocks are formed
            part = weight[rows].reshape(-1)
            for columns, block in _float64_columns(values, scratch):
                if gram is None or dot is None:
                    gram, dot = block @ block.T, block @ part[columns].double()
                else:  # accumulated by the products themselves (no zeros, no separate sums)
                    gram.addmm_(block, block.T)
                    dot.addmv_(block, part[columns].double())
        assert gram is not None and dot is not None, "_row_chunks yields at least one block"
        return gram, dot

    def dot(self, probe: torch.Tensor) -> torch.Tensor:
        return self._dot(probe, self._unfolded())

    def _dot(self, probe: torch.Tensor, unfolded: torch.Tensor | None) -> torch.Tensor:
        dtype = _combine_dtype(self.grads)
        weight = probe.reshape(self.d_out, self.d_in).to(dtype)
        out = torch.empty(self.n, dtype=torch.float64, device=self.grads.device)
        for block in _blocks(self.n, self.positions * (self.d_in + self.d_out), self.grads.device):
            projected = self._a(block, unfolded) @ weight.T  # [s, T, d_out], the layer's forward cost
            out[block] = (projected * self.grads[block].to(dtype)).sum(dim=(1, 2), dtype=torch.float64)
        return out

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        m, dtype = weights.shape[0], _combine_dtype(self.grads)
        contract = self.contract if self.positions >= KERNEL_POSITIONS else None
        unfolded = None if contract is not None else self._unfolded()
        out: torch.Tensor | None = None
        for block in _blocks(self.n, m * self.positions * self.d_out, self.grads.device):
            scaled = weights[:, block, None, None].to(dtype) * self.grads[block].to(dtype)  # [m, s, T, d_out]
            if contract is not None:
                part = torch.stack([contract(self.inputs[block], scaled[row]) for row in range(m)])
            else:
                part = scaled.flatten(1, 2).transpose(1, 2) @ self._a(block, unfolded).flatten(0, 1)
            out = part if out is None else out.add_(part.view_as(out))
        assert out is not None, "_blocks yields at least one block"
        return out.view(m, *self.shape)


def ghost_group_fits(pieces: Sequence[Outer]) -> bool:
    """Whether ``ghost_grams`` may take these pieces at once: the stacked float64 factors and the pairwise products
    ``[layers, n T, n T]`` (three of them at once) fit the workspace, as does each piece's rows."""
    first = pieces[0]
    rows = first.n * first.positions
    each = rows * (first.d_in + first.d_out) + 3 * rows * rows
    limit = workspace(first.grads.device)
    return first.n * first.positions * first.d_in <= limit and len(pieces) * each <= limit


def ghost_grams(pieces: Sequence[Outer], probes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed Gram blocks ``sum_l G_l G_l^T`` and products ``sum_l G_l probe_l`` of ghost ``Outer`` pieces that
    share their shapes (``n``, positions, ``d_in``, ``d_out``), in two batched products for all of them.

    Each layer's rows and output gradients are copied into one float64 stack once (a piece alone casts both sides
    of its products), and the layers' ``(a_t . a'_s)(b_t . b'_s)`` terms are summed in one reduction: fewer,
    larger operations than a loop over the layers, the same float64 terms. ``G probe`` stays one product per
    layer (its weights differ), in the working precision as ``Outer.dot``. The caller checks ``ghost_group_fits``.
    """
    first = pieces[0]
    n, positions, device = first.n, first.positions, first.grads.device
    a = torch.empty(len(pieces), n, positions, first.d_in, dtype=torch.float64, device=device)
    b = torch.empty(len(pieces), n, positions, first.d_out, dtype=torch.float64, device=device)
    dots = torch.zeros(n, dtype=torch.float64, device=device)
    for layer, (piece, probe) in enumerate(zip(pieces, probes, strict=True)):
        unfolded = piece._unfolded()
        assert unfolded is not None, "ghost_group_fits checks that the rows fit"
        a[layer].copy_(unfolded)
        b[layer].copy_(piece.grads)
        dots += piece._dot(probe, unfolded)
    a, b = a.flatten(1, 2), b.flatten(1, 2)
    pair = torch.bmm(a, a.transpose(1, 2)).mul_(torch.bmm(b, b.transpose(1, 2)))  # [layers, n T, n T]
    return pair.view(-1, n, positions, n, positions).sum(dim=(0, 2, 4)), dots


def prefer_ghost(*, positions: int, d_in: int, d_out: int) -> bool:
    """Ghost inner products cost ``T^2 (d_in + d_out)`` per sample pair, materialised gradients ``d_in d_out``."""
    return positions * positions * (d_in + d_out) < d_in * d_out


@dataclass
class Lookup:
    """An embedding table whose per-sample gradient scatters ``grads[i, t]`` into row ``index[i, t]``."""

    index: torch.Tensor  # [n, T] int64
    grads: torch.Tensor  # [n, T, D]
    num_rows: int

    @property
    def n(self) -> int:
        return self.grads.shape[0]

    def gram(self, other: Piece) -> torch.Tensor:
        assert isinstance(other, Lookup)
        n, t = self.index.shape
        index2, b2 = other.index.reshape(-1), other.grads.double().flatten(0, 1)
        out = torch.empty(n, other.n, dtype=torch.float64, device=self.grads.device)
        for block in _blocks(n, t * index2.numel(), self.grads.device):
            same = self.index[block].reshape(-1, 1) == index2.reshape(1, -1)
            pair = (self.grads[block].double().flatten(0, 1) @ b2.T) * same
            out[block] = pair.view(-1, t, other.n, other.index.shape[1]).sum(dim=(1, 3))
        return out

    def gram_and_dot(self, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gram(self), self.dot(probe)

    def dot(self, probe: torch.Tensor) -> torch.Tensor:
        return (probe.double()[self.index] * self.grads.double()).sum(dim=(1, 2))

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        m, width, dtype = weights.shape[0], self.grads.shape[2], _combine_dtype(self.grads)
        scaled = weights.to(dtype)[:, :, None, None] * self.grads.to(dtype)  # [m, n, T, D]
        out = torch.zeros(m, self.num_rows, width, dtype=dtype, device=self.grads.device)
        return out.index_add_(1, self.index.reshape(-1), scaled.flatten(1, 2))
