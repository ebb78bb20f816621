"""Per-sample gradients with torch.func (functional_call + grad + vmap), plus a batch-size-1 loop fallback.

vmap runs the model once per sample in a vectorised way, so the result equals a loop of batch-size-1 backward
passes. Models whose forward mixes samples (BatchNorm in train mode) or uses operations vmap cannot batch are
the limits: BatchNorm layers are therefore evaluated in eval mode here (running statistics, no update), and a
model vmap rejects gets either a clear error or, with ``engine="vmap_or_loop"`` (the default), the exact but slower
loop engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_map

from orthograd.choices import check_choice, choices

LossFn = Callable[[nn.Module, Any], torch.Tensor]
GradEngine = Literal["vmap_or_loop", "vmap", "loop"]
ENGINES: tuple[str, ...] = choices(GradEngine)

log = logging.getLogger(__name__)


class PerSampleGradError(RuntimeError):
    """vmap could not compute per-sample gradients for this model."""


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: Iterable[str] | None = None,
    chunk_size: int | None = None,
    engine: GradEngine = "vmap_or_loop",
) -> dict[str, torch.Tensor]:
    """Gradient of each sample's loss with respect to the chosen parameters.

    ``loss_fn(model, batch)`` returns a vector of ``k`` per-sample losses; ``batch`` is a tensor, tuple, list or
    dict of tensors whose first dimension is the sample index. ``params`` names the parameters to differentiate
    (default: every parameter with ``requires_grad``, e.g. only the LoRA factors of a peft model).
    ``chunk_size`` bounds how many samples vmap processes at once (memory). Returns ``{name: [k, *shape]}``.

    BatchNorm modules run in eval mode during the computation (vmap cannot update running statistics); the
    module's modes are restored afterwards.
    """
    grads, _, _ = per_sample_grads_losses_and_engine(
        model, loss_fn, batch, params=params, chunk_size=chunk_size, engine=engine
    )
    return grads


def per_sample_grads_and_losses(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: Iterable[str] | None = None,
    chunk_size: int | None = None,
    engine: GradEngine = "vmap_or_loop",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``per_sample_grads`` that also returns the ``[k]`` per-sample losses (detached), at no extra cost."""
    grads, losses, _ = per_sample_grads_losses_and_engine(
        model, loss_fn, batch, params=params, chunk_size=chunk_size, engine=engine
    )
    return grads, losses


def per_sample_grads_losses_and_engine(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: Iterable[str] | None = None,
    chunk_size: int | None = None,
    engine: GradEngine = "vmap_or_loop",
) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
    """``per_sample_grads_and_losses`` that also names the engine that ran: "vmap" or "loop" (``"vmap_or_loop"``
    runs vmap, and the loop where vmap rejects the model)."""
    check_choice("engine", engine, GradEngine)
    names = _resolve_params(model, params)
    if engine == "loop":
        return *_loop_grads(model, loss_fn, batch, names), "loop"
    try:
        return *_vmap_grads(model, loss_fn, batch, names, chunk_size), "vmap"
    except PerSampleGradError as exc:
        if engine == "vmap":
            raise
        _warn_once(f"vmap cannot handle {type(model).__name__} ({exc}); using the batch-size-1 loop engine (exact)")
        return *_loop_grads(model, loss_fn, batch, names), "loop"


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log a fallback once per process with its reason (a run would otherwise repeat it at every step)."""
    if message in _WARNED:
        log.debug(message)
        return
    _WARNED.add(message)
    log.warning(message)


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch (the first dimension of its tensors, which must agree)."""
    leaves = [leaf for leaf in tree_flatten(batch)[0] if isinstance(leaf, torch.Tensor)]
    if not leaves:
        raise ValueError("a batch must contain at least one tensor")
    sizes = {leaf.shape[0] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(f"all tensors in a batch need the same first dimension, got sizes {sorted(sizes)}")
    return sizes.pop()


def _resolve_params(model: nn.Module, params: Iterable[str] | None) -> list[str]:
    available = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in available.items() if p.requires_grad]
    else:
        names = list(params)
        missing = [n for n in names if n not in available]
        if missing:
            raise KeyError(f"parameters not in the model: {missing[:5]}; see model.named_parameters() for names")
    if not names:
        raise ValueError("no parameters to differentiate: set requires_grad on some parameters or pass params=")
    return names


class _LossModule(nn.Module):
    """Wraps (model, loss_fn) as one module so torch.func.functional_call can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


@contextmanager
def batchnorm_in_eval(model: nn.Module | Iterable[nn.Module]) -> Iterator[None]:
    """Put BatchNorm layers in eval mode for the duration (restoring each layer's mode afterwards).

    ``model`` may also be its modules listed once (``tuple(model.modules())``), for calls at every step."""
    modules = model.modules() if isinstance(model, nn.Module) else model
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(norms, modes, strict=True):
            m.train(mode)


def _vmap_grads(
    model: nn.Module, loss_fn: LossFn, batch: Any, names: list[str], chunk_size: int | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    wrapper = _LossModule(model, loss_fn)
    wanted = set(names)
    trainable = {f"model.{n}": p.detach() for n, p in model.named_parameters() if n in wanted}

    def one_sample_loss(theta: Mapping[str, torch.Tensor], sample: Any) -> torch.Tensor:
        single = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)
        losses: torch.Tensor = functional_call(wrapper, dict(theta), (single,), strict=False)
        return losses.reshape(-1)[0]

    per_sample = vmap(grad_and_value(one_sample_loss), in_dims=(None, 0), chunk_size=chunk_size)
    with batchnorm_in_eval(model):
        try:
            grads, losses = per_sample(trainable, batch)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            raise PerSampleGradError(
                f"torch.func.vmap could not compute per-sample gradients for {type(model).__name__}: {exc}. "
                "Use engine='loop' (exact, slower), or replace in-place/batch-mixing operations in the model."
            ) from exc
    # detached: with only some parameters chosen, the outputs would otherwise keep the graph of the others alive
    return {n: grads[f"model.{n}"].detach() for n in names}, losses.detach()


def _loop_grads(
    model: nn.Module, loss_fn: LossFn, batch: Any, names: list[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Reference engine: one backward per sample. Exact for any model autograd can differentiate."""
    named = dict(model.named_parameters())
    chosen = [named[n] for n in names]
    frozen = [n for n in names if not named[n].requires_grad]
    if frozen:
        raise ValueError(f"the loop engine differentiates only parameters with requires_grad; frozen: {frozen[:5]}")
    rows: list[tuple[torch.Tensor, ...]] = []
    losses: list[torch.Tensor] = []
    with batchnorm_in_eval(model):
        for index in range(batch_size_of(batch)):
            single = tree_map(partial(_row, index=index), batch)
            loss = loss_fn(model, single).reshape(-1)[0]
            rows.append(torch.autograd.grad(loss, chosen, allow_unused=True))
            losses.append(loss.detach())
    grads = {
        n: torch.stack([r[i] if r[i] is not None else torch.zeros_like(chosen[i]) for r in rows])
        for i, n in enumerate(names)
    }
    return grads, torch.stack(losses)


def _row(value: Any, *, index: int) -> Any:
    """Sample ``index`` of a batch leaf, kept as a batch of one (non-tensor leaves pass through)."""
    return value[index : index + 1] if isinstance(value, torch.Tensor) else value
