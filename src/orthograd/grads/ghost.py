"""Ghost engine: the k x k Gram matrix of per-sample gradients, ``G g`` and ``G^T w`` without forming ``G``.

OrthoGrad needs from the per-sample retain gradients ``G`` ([k, d]) only ``G G^T``, ``G g_u`` and a weighted sum
``G^T w``. Per layer these follow from the layer's input and the gradient of the summed loss with respect to its
output (the "book-keeping" / ghost-norm idea of differentially private training, here extended from norms to
inner products). One forward and one backward of the retain batch, with a forward hook on every layer that owns
trainable parameters, capture both: the hook keeps the input and the output's gradient edge, and
``torch.autograd.grad`` returns the output gradients without computing any parameter gradient (edges, unlike
full backward hooks, survive the in-place ReLU of torchvision's ResNet). ``ghost_layers`` turns them into pieces.

``chunk_size`` processes the retain batch in chunks of samples (bounding the autograd memory); Gram blocks between
chunks are accumulated from the stored pieces, with as few products as the pieces allow: materialised pieces
joined side by side, ghost pieces of one shape in one batched product. ``ghost_plan`` checks a model once for a
run's repeated passes (OrthoGrad's gradient source keeps one), so a step does not walk the model's modules.
BatchNorm runs in eval mode (per-sample gradients of a batch-mixing layer do not exist), as in the torch.func
engine. ``unsupported_reason`` says when a model needs that engine.

``ghost_span_and_mean`` also takes OrthoGrad's forget batch into the same forward and backward (appended to the
last chunk) and forms its mean gradient, the probe, from its rows' pieces: one pass where two would run. Exact
only when samples do not interact, so it declines (returns None) unless the model is wholly in eval mode (no
dropout draws, no batch statistics) and the two batches concatenate (same structure and per-sample shapes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from orthograd.grads.functorch import PerSampleGradError, batch_size_of, batchnorm_in_eval
from orthograd.grads.ghost_layers import _Transposed, layer_pieces
from orthograd.grads.ghost_layers import unsupported_reason as layer_unsupported_reason
from orthograd.grads.ghost_math import Dense, Outer, Piece, ghost_grams, ghost_group_fits, summed_only, workspace

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class GhostUnsupportedError(PerSampleGradError):
    """The ghost engine cannot compute this model's per-sample gradients; use the torch.func engine."""


@dataclass
class GhostSpan:
    """What OrthoGrad needs of the per-sample retain gradients ``G`` ([k, d] over the chosen parameters).

    gram: ``G G^T`` [k, k] float64; product: ``G probe`` [k] float64; losses: the k per-sample losses.
    row_bytes: bytes the pass captured per sample (layer inputs and output gradients), for memory estimates.
    A ``RetainSpan`` (``methods/orthograd/span.py``): ``norms`` and ``update`` give OrthoGrad's terms from the k x k
    system alone and from one contraction.
    ``combine(weights)`` returns ``weights @ G`` per parameter for ``[m, k]`` weights (e.g. ``1/k`` for the mean);
    it is called once, with every row needed, and then frees the pieces (layer inputs and output gradients, as
    large as the retain batch's activations) before the caller combines the results further.
    """

    gram: torch.Tensor
    product: torch.Tensor
    losses: torch.Tensor
    pieces: dict[str, list[tuple[int, Piece]]] | None
    row_bytes: float = 0.0

    @property
    def retain_loss(self) -> float:
        """The mean of the per-sample losses."""
        return float(self.losses.mean())

    def combine(self, weights: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """``weights @ G`` for each of the ``m`` rows of ``weights`` ([m, k]), as ``m`` dicts of parameter tensors.

        Each row costs one weight-gradient-sized contraction per layer: pass one row where one suffices (e.g.
        ``alpha / k + (1 - alpha) c`` for OrthoGrad's update, whose norms follow from ``gram`` and ``product``).
        """
        if self.pieces is None:
            raise RuntimeError("GhostSpan.combine frees the per-sample pieces: call it once, with every row needed")
        pieces, self.pieces = self.pieces, None
        order = list(pieces)
        totals: dict[str, torch.Tensor] = {}

        def add(name: str, part: torch.Tensor) -> None:
            totals[name] = totals[name] + part if name in totals else part

        dense = _dense_pieces(pieces)
        for group in _column_groups(list(dense), dense, weights.device):  # one product per chunk for the group
            for c, (start, first) in enumerate(dense[group[0]]):
                members = {name: dense[name][c][1] for name in group}
                for name, part in _dense_combine(weights[:, start : start + first.n], members).items():
                    add(name, part)
            for name in group:
                del pieces[name]
        for name in list(pieces):
            for start, piece in pieces.pop(name):  # each layer's factors are freed once combined
                add(name, piece.combine(weights[:, start : start + piece.n]))
        return [{name: totals[name][row] for name in order} for row in range(weights.shape[0])]

    def norms(self, coeffs: torch.Tensor, *, probe_norm: float) -> tuple[float, float]:
        """``|mean(G)|`` and ``|probe - G^T coeffs|`` from the k x k quantities alone (no pass over the layers).

        ``probe_norm`` is ``|probe|``; with OrthoGrad's projection coefficients the second norm is ``|g_u_perp|``.
        """
        gram, coeffs = self.gram, coeffs.to(self.gram)
        mean = torch.full_like(coeffs, 1.0 / coeffs.numel())
        residual = probe_norm**2 - 2.0 * float(coeffs @ self.product) + float(coeffs @ gram @ coeffs)
        return math.sqrt(max(float(mean @ gram @ mean), 0.0)), math.sqrt(max(residual, 0.0))

    def update(
        self, probe: Mapping[str, torch.Tensor], coeffs: torch.Tensor, *, mean_weight: float, residual_weight: float
    ) -> dict[str, torch.Tensor]:
        """``mean_weight * mean(G) - residual_weight * (probe - G^T coeffs)`` in one contraction per layer.

        OrthoGrad's update is ``alpha * mean(G_r) - (1 - alpha) * g_u_perp``: ``probe`` the forget gradient,
        ``coeffs`` its projection coefficients, ``mean_weight = alpha`` and ``residual_weight = 1 - alpha`` (times
        the inverse norms from ``norms`` to put both terms at unit norm). Frees the pieces, like ``combine``.
        """
        coeffs = coeffs.to(self.gram)
        weights = mean_weight / coeffs.numel() + residual_weight * coeffs
        (combined,) = self.combine(weights[None])
        return {name: combined[name].to(p.dtype).sub_(p, alpha=residual_weight) for name, p in probe.items()}


def unsupported_reason(model: nn.Module, params: Iterable[str] | None = None) -> str | None:
    """Why the ghost engine cannot handle ``model`` for the given trainable parameters (None when it can)."""
    wanted = set(_resolve(model, params))
    owners: dict[int, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if _is_peft_attention(module) and any(n.startswith(f"{module_name}.") for n in wanted):
            return (
                f"{module_name}: peft's LoRA on nn.MultiheadAttention folds its factors into the weights inside the "
                "forward; attach LoRA with orthograd.attach_lora, which adapts the attention's projections as linears"
            )
        for local, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{local}" if module_name else local
            if id(param) in owners and owners[id(param)] != full and (full in wanted or owners[id(param)] in wanted):
                return f"parameter {full} is shared with {owners[id(param)]}"
            owners[id(param)] = full
            if full not in wanted:
                continue
            reason = layer_unsupported_reason(module)
            if reason is not None:
                return f"{module_name or type(model).__name__}: {reason}"
    return None


@dataclass(frozen=True)
class GhostPlan:
    """A model's chosen parameters and the modules that own them, checked once (``ghost_plan``) so that repeated
    ghost passes over the same model skip the walk over its modules (a few ms a step on a small model)."""

    model: nn.Module
    names: list[str]
    owners: dict[str, tuple[nn.Module, list[tuple[str, str]]]]
    params: dict[str, nn.Parameter]
    modules: tuple[nn.Module, ...]  # every submodule, for the train/eval checks of each pass


def ghost_plan(model: nn.Module, params: Iterable[str] | None = None) -> GhostPlan:
    """``model``'s chosen parameters (default: the trainable ones) checked for the ghost engine, for repeated passes
    as ``params=``. Raises ``GhostUnsupportedError`` when a layer is unsupported. The model's structure and the
    parameters' ``requires_grad`` must not change while it is in use."""
    names = _resolve(model, params)
    reason = unsupported_reason(model, names)
    if reason is not None:
        raise GhostUnsupportedError(reason)
    named = dict(model.named_parameters())
    return GhostPlan(model=model, names=names, owners=_owners(model, names),
                       params={name: named[name] for name in names}, modules=tuple(model.modules()))


def ghost_span(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    probe: Mapping[str, torch.Tensor],
    params: Iterable[str] | GhostPlan | None = None,
    chunk_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> GhostSpan:
    """Gram matrix, product with ``probe`` and per-sample pieces of the per-sample gradients of ``loss_fn``.

    ``loss_fn(model, batch)`` returns ``k`` per-sample losses; ``probe`` maps every chosen parameter name to a tensor
    of its shape (OrthoGrad passes the forget gradient). ``params``: parameter names (default: the trainable ones),
    or a ``GhostPlan`` of this model prepared once. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the
    forward and backward under autocast; Gram blocks and products are always accumulated in float64.
    Raises ``GhostUnsupportedError`` when a layer is unsupported or is not called exactly once per forward.
    """
    plan = _prepared(model, params)
    missing = [n for n in plan.names if n not in probe]
    if missing:
        raise KeyError(f"probe lacks parameters {missing[:5]}; pass a tensor for every differentiated parameter")
    found = _ghost_pass(plan, loss_fn, batch, batch_size_of(batch), chunk_size, autocast_dtype)
    return found.span(probe)


def ghost_span_and_mean(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    mean_batch: Any,
    *,
    params: Iterable[str] | GhostPlan | None = None,
    chunk_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[GhostSpan, torch.Tensor, dict[str, torch.Tensor]] | None:
    """``ghost_span`` of ``batch`` probed with the gradient of ``mean_batch``'s mean loss, both from one pass.

    Returns the span, that mean loss and its gradient (in the parameters' dtypes), or None when the batches cannot
    share a pass exactly (see the module docstring; the caller then runs them separately). The gradient is the
    sum of ``mean_batch``'s per-sample pieces, whose output gradients the backward already scaled by ``1/k``.
    """
    plan = _prepared(model, params)
    if any(module.training for module in plan.modules):
        return None
    both = joined(batch, mean_batch)
    if both is None:
        return None
    found = _ghost_pass(plan, loss_fn, both, batch_size_of(batch), chunk_size, autocast_dtype)
    dense = {name: [(0, piece)] for name, piece in found.mean_pieces.items() if isinstance(piece, Dense)}
    sums: dict[str, torch.Tensor] = {}
    for group in _column_groups(list(dense), dense, found.losses.device):  # one product for a group's sums
        members = {name: dense[name][0][1] for name in group}
        ones = torch.ones(1, members[group[0]].n, device=found.losses.device)
        sums.update({name: part[0] for name, part in _dense_combine(ones, members).items()})
    probe = {
        name: sums[name].to(param.dtype) if name in sums else _summed(found.mean_pieces[name], param)
        for name, param in plan.params.items()
    }
    found.mean_pieces.clear()
    assert found.mean_loss is not None
    return found.span(probe), found.mean_loss, probe


def joined(batch: Any, extra: Any) -> Any | None:
    """``batch`` followed by ``extra`` along the sample dimension; None when they differ in structure, in a
    non-tensor leaf, or in a tensor's dtype, device or per-sample shape (e.g. sequences padded to other lengths)."""
    leaves, spec = tree_flatten(batch)
    extra_leaves, extra_spec = tree_flatten(extra)
    if spec != extra_spec:
        return None
    out = []
    for mine, theirs in zip(leaves, extra_leaves, strict=True):
        tensors = isinstance(mine, torch.Tensor), isinstance(theirs, torch.Tensor)
        if tensors == (True, True) and mine.dim() > 0 and _row_shape(mine) == _row_shape(theirs):
            out.append(torch.cat([mine, theirs]))
        elif tensors == (False, False) and (mine is theirs or mine == theirs):
            out.append(mine)
        else:
            return None
    return tree_unflatten(out, spec)


def _row_shape(t: torch.Tensor) -> tuple[Any, ...]:
    return t.shape[1:], t.dtype, t.device


def _prepared(model: nn.Module, params: Iterable[str] | GhostPlan | None) -> GhostPlan:
    """``params`` as a ``GhostPlan`` of ``model`` (checked now unless it already is one)."""
    if not isinstance(params, GhostPlan):
        return ghost_plan(model, params)
    if params.model is not model:
        raise ValueError("params is a GhostPlan of another model; prepare one with ghost_plan(model)")
    return params


def _is_peft_attention(module: nn.Module) -> bool:
    """peft's LoRA layer for ``nn.MultiheadAttention`` (recognised without importing peft)."""
    cls = type(module)
    return cls.__name__ == "MultiheadAttention" and cls.__module__.startswith("peft.")


def _resolve(model: nn.Module, params: Iterable[str] | None) -> list[str]:
    if params is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    return list(params)


def _owners(model: nn.Module, names: list[str]) -> dict[str, tuple[nn.Module, list[tuple[str, str]]]]:
    """Module name -> (module, [(local parameter name, full name)]) for the modules owning the chosen parameters."""
    wanted = set(names)
    owners: dict[str, tuple[nn.Module, list[tuple[str, str]]]] = {}
    for module_name, module in model.named_modules():
        for local, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{local}" if module_name else local
            if full in wanted:
                owners.setdefault(module_name, (module, []))[1].append((local, full))
    return owners


@dataclass
class _Capture:
    inputs: list[torch.Tensor]
    edges: list[GradientEdge]


@contextmanager
def _capturing(modules: Mapping[str, tuple[nn.Module, Any]]) -> Iterator[dict[str, _Capture]]:
    """Forward hooks that record each module's input and the gradient edge of its output."""
    captures = {name: _Capture([], []) for name in modules}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                raise GhostUnsupportedError(f"{name}: the ghost engine needs a tensor input and a tensor output")
            captures[name].inputs.append(args[0].detach())
            captures[name].edges.append(get_gradient_edge(output))

        return hook

    with ExitStack() as stack:
        for name, (module, _) in modules.items():
            stack.callback(module.register_forward_hook(hook_for(name)).remove)
        yield captures


@dataclass
class _Pass:
    """What one ghost pass found: the span batch's losses and pieces, and those of the mean batch (if any)."""

    k: int
    losses: torch.Tensor
    pieces: dict[str, list[tuple[int, Piece]]]
    mean_loss: torch.Tensor | None
    mean_pieces: dict[str, Piece]
    row_bytes: float

    def span(self, probe: Mapping[str, torch.Tensor]) -> GhostSpan:
        gram, product = _accumulate(self.pieces, probe, self.k)
        return GhostSpan(gram=gram, product=product, losses=self.losses, pieces=self.pieces, row_bytes=self.row_bytes)


def _ghost_pass(
    plan: GhostPlan,
    loss_fn: LossFn,
    batch: Any,
    k: int,
    chunk_size: int | None,
    autocast_dtype: torch.dtype | None,
) -> _Pass:
    """Pieces of the first ``k`` samples of ``batch`` in chunks of ``chunk_size``; any samples after them (the mean
    batch) join the last chunk, with their losses averaged instead of summed."""
    model, names, modules = plan.model, plan.names, plan.owners
    step = k if chunk_size is None else chunk_size
    starts = list(range(0, k, step))
    ends = [*starts[1:], batch_size_of(batch)]
    pieces: dict[str, list[tuple[int, Piece]]] = {n: [] for n in names}
    mean_pieces: dict[str, Piece] = {}
    losses, mean_loss, captured = [], None, 0
    with batchnorm_in_eval(plan.modules):
        for start, end in zip(starts, ends, strict=True):
            rows = slice(start, end)
            chunk = tree_map(lambda t, rows=rows: t[rows] if isinstance(t, torch.Tensor) else t, batch)
            own = min(end, k) - start
            chunk_losses, chunk_pieces, chunk_bytes = _chunk_pieces(model, loss_fn, chunk, own, modules, autocast_dtype)
            captured += chunk_bytes
            losses.append(chunk_losses[:own])
            if own < end - start:
                mean_loss = chunk_losses[own:].to(torch.promote_types(chunk_losses.dtype, torch.float32)).mean()
            for name, (piece, mean_piece) in chunk_pieces.items():
                pieces[name].append((start, piece))
                if mean_piece is not None:
                    mean_pieces[name] = mean_piece
    n_rows = batch_size_of(batch)
    return _Pass(k=k, losses=torch.cat(losses), pieces=pieces, mean_loss=mean_loss, mean_pieces=mean_pieces,
                 row_bytes=captured / max(n_rows, 1))


def _chunk_pieces(
    model: nn.Module,
    loss_fn: LossFn,
    chunk: Any,
    own: int,
    modules: Mapping[str, tuple[nn.Module, list[tuple[str, str]]]],
    autocast_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, dict[str, tuple[Piece, Piece | None]], int]:
    """One forward and one backward of a chunk: its losses and the pieces of every chosen parameter, for its first
    ``own`` samples (losses summed) and, when there are more, for the rest apart (their losses averaged); and the
    bytes of the layer inputs and output gradients it captured."""
    n = batch_size_of(chunk)
    device_type = next(model.parameters()).device.type
    amp = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with _capturing(modules) as captures, amp:
        losses = loss_fn(model, chunk).reshape(-1)
    for name, capture in captures.items():
        if len(capture.edges) != 1:
            raise GhostUnsupportedError(
                f"module {name!r} ran {len(capture.edges)} times in one forward; the ghost engine needs exactly once"
            )
    if losses.shape[0] != n:
        raise ValueError(f"loss_fn returned {losses.shape[0]} losses for a batch of {n} samples")
    wide = losses.to(torch.promote_types(losses.dtype, torch.float32))  # 1/k of the mean in the model's precision
    objective = wide[:own].sum() if own == n else wide[:own].sum() + wide[own:].mean()
    order = list(captures)
    grads = torch.autograd.grad(
        objective, [captures[name].edges[0] for name in order], allow_unused=True, materialize_grads=True
    )
    pieces: dict[str, tuple[Piece, Piece | None]] = {}
    captured = 0
    for name, output_grads in zip(order, grads, strict=True):
        module, params = modules[name]
        inputs = captures[name].inputs[0]
        if inputs.shape[0] != n or output_grads.shape[0] != n:
            raise GhostUnsupportedError(
                f"module {name!r} saw a leading dimension of {inputs.shape[0]} for {n} samples; the ghost engine "
                "needs the sample dimension first in every layer (batch_first)"
            )
        output_grads = output_grads.detach()
        captured += inputs.numel() * inputs.element_size() + output_grads.numel() * output_grads.element_size()
        local = layer_pieces(module, inputs[:own], output_grads[:own])
        rest = {}
        if own < n:
            with summed_only():
                rest = layer_pieces(module, inputs[own:], output_grads[own:])
        for local_name, full in params:
            pieces[full] = (local[local_name], rest.get(local_name))
    return losses.detach(), pieces, captured


def _summed(piece: Piece, like: torch.Tensor) -> torch.Tensor:
    """The sum of a piece's per-sample gradients (one weight-gradient contraction), as ``like``'s dtype."""
    return piece.combine(torch.ones(1, piece.n, device=like.device))[0].to(like.dtype)


def _accumulate(
    pieces: Mapping[str, list[tuple[int, Piece]]], probe: Mapping[str, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over parameters of the Gram blocks between every pair of chunks, and of the products with ``probe``.

    Materialised pieces (``Dense``: norm and bias parameters, small factors) are joined side by side per chunk and
    take one float64 product per block for all of them (``_dense_blocks``) instead of one per parameter; ghost
    pieces of one chunk that share their shapes take one batched product per group (``ghost_grams``).
    """
    device = probe[next(iter(pieces))].device
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    product = torch.zeros(k, dtype=torch.float64, device=device)
    dense = _dense_pieces(pieces)
    done = set(dense)
    for group in _column_groups(list(dense), dense, device):
        _dense_blocks(gram, product, {name: dense[name] for name in group}, probe)
    for ghosts in same_shape_ghosts(pieces, probe):
        block, dots = ghost_grams([piece for piece, _ in ghosts.values()], [p for _, p in ghosts.values()])
        gram += block
        product += dots
        done.update(ghosts)
    for name, chunks in pieces.items():
        if name in done:
            continue
        for i, (start_i, piece_i) in enumerate(chunks):
            rows = slice(start_i, start_i + piece_i.n)
            block, dot = piece_i.gram_and_dot(probe[name])  # one pass over the chunk's per-sample gradients
            gram[rows, rows].add_(block)  # in place on the view (``+=`` on an index writes it back once more)
            product[rows].add_(dot)
            for start_j, piece_j in chunks[:i]:
                cols = slice(start_j, start_j + piece_j.n)
                block = piece_i.gram(piece_j)
                gram[rows, cols].add_(block)
                gram[cols, rows].add_(block.T)
    return gram, product


def _dense_pieces(pieces: Mapping[str, list[tuple[int, Piece]]]) -> dict[str, list[tuple[int, Dense]]]:
    """The parameters whose pieces are all materialised (``Dense``), with their chunks."""
    dense: dict[str, list[tuple[int, Dense]]] = {}
    for name, chunks in pieces.items():
        materialised = [(start, piece) for start, piece in chunks if isinstance(piece, Dense)]
        if len(materialised) == len(chunks):
            dense[name] = materialised
    return dense


def _dense_combine(weights: torch.Tensor, pieces: Mapping[str, Dense]) -> dict[str, torch.Tensor]:
    """``weights @ values`` ([m, *shape]) of materialised pieces of the same samples, joined side by side: one
    product for all of them (in float32, or float64 where a piece is) instead of one per parameter."""
    values = [piece.values.flatten(1) for piece in pieces.values()]
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
    flat = weights.to(dtype) @ torch.cat([v.to(dtype) for v in values], dim=1)
    parts = flat.split([v.shape[1] for v in values], dim=1)
    return {name: part.reshape(weights.shape[0], *piece.values.shape[1:])
            for (name, piece), part in zip(pieces.items(), parts, strict=True)}


def same_shape_ghosts(
    pieces: Mapping[str, list[tuple[int, Piece]]], probe: Mapping[str, torch.Tensor]
) -> list[dict[str, tuple[Outer, torch.Tensor]]]:
    """The single-chunk ghost ``Outer`` pieces (a transposed one as its ``[out, in]`` form, with its probe
    transposed) grouped by shape, each group cut to what ``ghost_grams`` takes at once: name -> (piece, probe)."""
    by_shape: dict[tuple[Any, ...], list[tuple[str, Outer, torch.Tensor]]] = {}
    for name, chunks in pieces.items():
        if len(chunks) != 1:
            continue
        piece, weight = chunks[0][1], probe[name]
        if isinstance(piece, _Transposed):
            piece, weight = piece.inner, weight.transpose(0, 1)
        if isinstance(piece, Outer) and piece.ghost:
            key = (piece.n, piece.positions, piece.d_in, piece.d_out, piece.grads.dtype, piece.grads.device)
            by_shape.setdefault(key, []).append((name, piece, weight))
    groups: list[dict[str, tuple[Outer, torch.Tensor]]] = []
    for members in by_shape.values():
        group: dict[str, tuple[Outer, torch.Tensor]] = {}
        for name, piece, weight in members:
            if group and not ghost_group_fits([p for p, _ in group.values()] + [piece]):
                groups.append(group)
                group = {}
            if ghost_group_fits([piece]):
                group[name] = (piece, weight)
        if group:
            groups.append(group)
    return groups


def _column_groups(
    names: list[str], pieces: Mapping[str, list[tuple[int, Dense]]], device: torch.device
) -> Iterator[list[str]]:
    """``names`` in consecutive groups whose per-sample gradients, side by side for one chunk, fit the workspace."""
    group: list[str] = []
    width = 0
    for name in names:
        piece = pieces[name][0][1]
        columns = piece.values[0].numel()
        if group and (width + columns) * piece.n > workspace(device):
            yield group
            group, width = [], 0
        group.append(name)
        width += columns
    if group:
        yield group


def _dense_blocks(
    gram: torch.Tensor, product: torch.Tensor, pieces: Mapping[str, list[tuple[int, Dense]]],
    probe: Mapping[str, torch.Tensor],
) -> None:
    """Add the Gram blocks and probe products of materialised pieces, joined side by side, in float64."""
    names = list(pieces)
    starts = [start for start, _ in pieces[names[0]]]
    joined = [
        torch.cat([pieces[name][c][1].values.flatten(1) for name in names], dim=1).double()
        for c in range(len(starts))
    ]
    flat_probe = torch.cat([probe[name].reshape(-1) for name in names]).double()
    for i, (start_i, rows_i) in enumerate(zip(starts, joined, strict=True)):
        rows = slice(start_i, start_i + rows_i.shape[0])
        gram[rows, rows].add_(rows_i @ rows_i.T)
        product[rows].add_(rows_i @ flat_probe)
        for start_j, rows_j in zip(starts[:i], joined[:i], strict=True):
            cols = slice(start_j, start_j + rows_j.shape[0])
            block = rows_i @ rows_j.T
            gram[rows, cols].add_(block)
            gram[cols, rows].add_(block.T)
