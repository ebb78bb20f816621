"""Registry of the layers whose per-sample gradients the ghost engine derives from (input, output gradient).

One small function per layer type (the opacus ``grad_sample`` pattern): given the module, the input it saw for
``n`` samples and the gradient of the summed loss with respect to its output, return a ``Piece`` per trainable
parameter. The registry is public: ``register_ghost_rule`` adds a rule for a layer type of your own (as opacus'
``register_grad_sampler`` does), ``register_ghost_matcher`` one for types recognised by a predicate. Types match
exactly (a subclass may use its parameters differently, e.g. ``nn.MultiheadAttention``'s ``out_proj``), and each
type states what it cannot handle. peft LoRA layers need no entry of their own: their ``lora_A`` / ``lora_B``
factors are plain ``nn.Linear`` / ``nn.Conv2d`` modules called on the layer's input. Layers of transformers are
recognised without importing it (``register_ghost_matcher``): ``Conv1D`` (GPT-2's linear layer, weight
``[in, out]``) and the RMSNorm classes of its models (``LlamaRMSNorm`` and kin: ``weight * x / rms(x)``).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from orthograd.grads.ghost_math import Dense, Lookup, Outer, Piece, prefer_ghost

# fn(module, inputs [n, ...], output_grads [n, ...]) -> {local parameter name: Piece}. The registry calls a rule
# (and its check) only with instances of the types it was registered for, so the module parameter may name them.
GhostRule = Callable[..., dict[str, Piece]]
# check(module) -> why the rule cannot handle this instance (None: it can)
GhostCheck = Callable[..., str | None]
Rule = TypeVar("Rule", bound=GhostRule)


@dataclass(frozen=True)
class _Entry:
    pieces: GhostRule
    check: GhostCheck


_REGISTRY: dict[type[nn.Module], _Entry] = {}
_MATCHERS: list[tuple[Callable[[nn.Module], bool], _Entry]] = []  # rules for types recognised by a predicate


def _always(_: nn.Module) -> str | None:
    return None


def register_ghost_rule(*types: type[nn.Module], check: GhostCheck = _always) -> Callable[[Rule], Rule]:
    """Decorator: make ``fn(module, inputs, output_grads) -> {param name: Piece}`` the ghost rule of ``types``.

    ``inputs`` is the first positional argument the module was called with, for the ``n`` samples of a chunk
    (sample dimension first); ``output_grads`` is the gradient of the summed per-sample losses with respect to its
    output (the output's shape). Return a piece for each parameter the module owns directly (local names such as
    ``"weight"``; frozen ones are dropped for you): ``Dense(per-sample gradients [n, *param.shape])`` always works,
    ``Outer`` keeps a linear map's ``sum_t b_t a_t^T`` factored, ``Lookup`` an embedding's scatter. Types match
    exactly (a subclass needs its own rule). ``check(module)`` returns why an instance is unsupported (None when it
    is); the engine then falls back to torch.func and logs the reason. Registering a type again replaces its rule.
    """

    def decorate(fn: Rule) -> Rule:
        for cls in types:
            _REGISTRY[cls] = _Entry(fn, check)
        return fn

    return decorate


def register_ghost_matcher(
    predicate: Callable[[nn.Module], bool], *, check: GhostCheck = _always
) -> Callable[[Rule], Rule]:
    """Decorator: make ``fn`` the ghost rule of the modules for which ``predicate(module)`` holds, for types that
    cannot be named without importing an optional library (checked after the exact types, in registration order)."""

    def decorate(fn: Rule) -> Rule:
        _MATCHERS.append((predicate, _Entry(fn, check)))
        return fn

    return decorate


def _entry(module: nn.Module) -> _Entry | None:
    entry = _REGISTRY.get(type(module))
    if entry is not None:
        return entry
    return next((found for predicate, found in _MATCHERS if predicate(module)), None)


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (``y = x @ W + b`` with ``W`` of shape [in, out]); transformers is not imported."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and type(module) is getattr(utils, "Conv1D", None)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why the ghost engine cannot handle this module's trainable parameters (None when it can)."""
    entry = _entry(module)
    if entry is None:
        return f"no ghost rule for {type(module).__name__}"
    return entry.check(module)


def layer_pieces(module: nn.Module, inputs: torch.Tensor, output_grads: torch.Tensor) -> dict[str, Piece]:
    """Per-sample gradient pieces of the module's trainable parameters (local names such as ``weight``)."""
    entry = _entry(module)
    if entry is None:
        raise KeyError(f"no ghost rule for {type(module).__name__}")
    pieces = entry.pieces(module, inputs, output_grads)
    return {name: piece for name, piece in pieces.items() if getattr(module, name).requires_grad}


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Norm statistics are recomputed in float32 (float64 stays): bf16 autocast runs norm layers in float32 too."""
    return t if t.dtype == torch.float64 else t.float()


def _bias_piece(module: nn.Module, grads: torch.Tensor) -> dict[str, Piece]:
    """``{"bias": sum over positions of the output gradient}`` when the layer has a bias; ``grads`` is [n, T, d_out]."""
    return {"bias": Dense(grads.sum(dim=1))} if getattr(module, "bias", None) is not None else {}


@register_ghost_rule(nn.Linear)
def _linear(module: nn.Linear, inputs: torch.Tensor, output_grads: torch.Tensor) -> dict[str, Piece]:
    n, d_in, d_out = inputs.shape[0], module.in_features, module.out_features
    grads = output_grads.reshape(n, -1, d_out)
    weight = Outer(
        inputs=inputs,
        rows=lambda x: x.reshape(x.shape[0], -1, d_in),
        grads=grads,
        shape=module.weight.shape,
        ghost=prefer_ghost(positions=grads.shape[1], d_in=d_in, d_out=d_out),
    )
    return {"weight": weight.compact(), **_bias_piece(module, grads)}


@dataclass
class _Transposed:
    """Per-sample gradients of a weight stored transposed (Conv1D's [in, out]), from a piece of its [out, in] form."""

    inner: Piece

    @property
    def n(self) -> int:
        return self.inner.n

    def gram(self, other: Piece) -> torch.Tensor:
        assert isinstance(other, _Transposed)
        return self.inner.gram(other.inner)

    def gram_and_dot(self, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.gram_and_dot(probe.transpose(0, 1))

    def dot(self, probe: torch.Tensor) -> torch.Tensor:
        return self.inner.dot(probe.transpose(0, 1))

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        return self.inner.combine(weights).transpose(1, 2)


@register_ghost_matcher(is_transformers_conv1d)
def _transformers_conv1d(module: nn.Module, inputs: torch.Tensor, output_grads: torch.Tensor) -> dict[str, Piece]:
    n, (d_in, d_out) = inputs.shape[0], module.get_parameter("weight").shape
    grads = output_grads.reshape(n, -1, d_out)
    weight = Outer(
        inputs=inputs,
        rows=lambda x: x.reshape(x.shape[0], -1, d_in),
        grads=grads,
        shape=torch.Size((d_out, d_in)),
        ghost=prefer_ghost(positions=grads.shape[1], d_in=d_in, d_out=d_out),
    )
    return {"weight": _Transposed(weight.compact()), **_bias_piece(module, grads)}


def _conv_check(module: nn.Conv1d | nn.Conv2d) -> str | None:
    kind = type(module).__name__
    if module.groups != 1:
        return f"{kind} with groups={module.groups} (only groups=1)"
    if isinstance(module.padding, str) and module.padding != "valid":
        return f"{kind} with padding={module.padding!r} (use integer padding)"
    if module.padding_mode != "zeros":
        return f"{kind} with padding_mode={module.padding_mode!r} (only 'zeros')"
    return None


def _as_2d(value: tuple[int, ...] | int | str, filler: int) -> tuple[int, int] | int:
    """A Conv1d setting as the matching Conv2d setting over a height-1 image ([n, C, L] -> [n, C, 1, L])."""
    if isinstance(value, str):  # "valid"
        return 0
    return (filler, value[0]) if isinstance(value, tuple) else (filler, value)


@register_ghost_rule(nn.Conv1d, nn.Conv2d, check=_conv_check)
def _conv(module: nn.Conv1d | nn.Conv2d, inputs: torch.Tensor, output_grads: torch.Tensor) -> dict[str, Piece]:
    n, d_out = inputs.shape[0], module.out_channels
    one_d = isinstance(module, nn.Conv1d)
    kernel: tuple[int, ...] | int
    stride: tuple[int, ...] | int
    dilation: tuple[int, ...] | int
    padding: tuple[int, ...] | int
    if one_d:  # a Conv1d is a Conv2d over a height-1 image with a 1 x k kernel
        kernel, stride = _as_2d(module.kernel_size, 1), _as_2d(module.stride, 1)
        dilation, padding = _as_2d(module.dilation, 1), _as_2d(module.padding, 0)
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        # a string is "valid" (_conv_check refuses the others)
        padding = 0 if isinstance(module.padding, str) else module.padding

    def rows(x: torch.Tensor) -> torch.Tensor:
        image = x.unsqueeze(2) if one_d else x
        return image_patches(image, kernel=kernel, stride=stride, padding=padding, dilation=dilation)

    out_size = (1, output_grads.shape[2]) if one_d else tuple(output_grads.shape[2:])
    settings = [_pair(v) for v in (stride, padding, dilation)]

    def contract(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The weight gradient summed over the samples, by the layer's own kernel (no unfold; no TF32 on a GPU,
        so that ``G^T w`` has the float32 precision of the Gram matrix's per-sample gradients)."""
        image = (x.unsqueeze(2) if one_d else x).to(g.dtype)
        weight = (module.weight.unsqueeze(2) if one_d else module.weight).detach().to(g.dtype)
        g_image = g.transpose(1, 2).reshape(g.shape[0], d_out, *out_size)
        mask = [False, True, False]
        with _without_tf32():
            grad: torch.Tensor = torch.ops.aten.convolution_backward(
                g_image, image, weight, None, *settings, False, [0, 0], 1, mask
            )[1]
        return grad

    grads = output_grads.reshape(n, d_out, -1).transpose(1, 2)
    d_in = module.weight[0].numel()
    weight = Outer(
        inputs=inputs,
        rows=rows,
        grads=grads,
        shape=module.weight.shape,
        ghost=prefer_ghost(positions=grads.shape[1], d_in=d_in, d_out=d_out),
        contract=contract,
    )
    return {"weight": weight.compact(), **_bias_piece(module, grads)}


def _pair(value: tuple[int, ...] | int) -> list[int]:
    return list(value) if isinstance(value, tuple) else [value, value]


def image_patches(
    image: torch.Tensor,
    *,
    kernel: tuple[int, ...] | int,
    stride: tuple[int, ...] | int,
    padding: tuple[int, ...] | int,
    dilation: tuple[int, ...] | int,
) -> torch.Tensor:
    """Every convolution window of ``image`` ([n, C, H, W]) as a row: [n, positions, C * kh * kw], ordered as
    ``F.unfold(...).transpose(1, 2)`` and equal to it.

    Windows are a strided view of the zero-padded image and one copy: a fixed number of kernels whatever ``n``
    (``F.unfold`` on CUDA launches one kernel per sample, which made a ResNet18 step launch-bound; see
    benchmarks/RESULTS.md). The copy is laid out as ``F.unfold``'s ``[n, C * kh * kw, positions]`` (runs of
    contiguous output positions: 4-9x faster on a CPU than gathering each window's taps) and returned transposed,
    a view that matrix products read as it is.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (kernel, stride, padding, dilation))
    padded = F.pad(image, (pw, pw, ph, ph))
    windows = padded.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # [n, C, oh, ow, span, span]
    windows = windows[..., ::dh, ::dw]  # the dilated taps
    n, channels, oh, ow = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(n, channels * kh * kw, oh * ow).transpose(1, 2)


@contextmanager
def _without_tf32() -> Iterator[None]:
    cudnn = torch.backends.cudnn
    allowed, cudnn.allow_tf32 = cudnn.allow_tf32, False
    try:
        yield
    finally:
        cudnn.allow_tf32 = allowed


def _embedding_check(module: nn.Embedding) -> str | None:
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        return "Embedding with max_norm, scale_grad_by_freq or sparse gradients"
    return None


@register_ghost_rule(nn.Embedding, check=_embedding_check)
def _embedding(module: nn.Embedding, inputs: torch.Tensor, output_grads: torch.Tensor) -> dict[str, Piece]:
    n = inputs.shape[0]
    index = inputs.reshape(n, -1)
    grads = output_grads.reshape(n, index.shape[1], module.embedding_dim)
    if module.padding_idx is not None:  # the padding row gets no gradient
        grads = grads * index.ne(module.padding_idx).unsqueeze(-1)
    return {"weight": Lookup(index=index, grads=grads, num_rows=module.num_embeddings)}


def _affine_pieces(
    module: nn.Module, normalised: torch.Tensor, output_grads: torch.Tensor, channel_dim: int
) -> dict[str, Piece]:
    """Weight and bias pieces of an elementwise affine ``y = x_hat * weight + bias`` over ``channel_dim``."""
    weight = module.get_parameter("weight")
    n, channels = normalised.shape[0], weight.numel()
    if channel_dim == 1:  # [n, C, *] -> per-channel sums over the remaining dims
        product = (normalised * output_grads).reshape(n, channels, -1).sum(dim=2)
        pieces: dict[str, Piece] = {"weight": Dense(product)}
        summed = output_grads.reshape(n, channels, -1).sum(dim=2)
    else:  # trailing normalised shape -> sums over the leading positions
        product = (normalised * output_grads).reshape(n, -1, channels).sum(dim=1)
        pieces = {"weight": Dense(product.view(n, *weight.shape))}
        summed = output_grads.reshape(n, -1, channels).sum(dim=1)
    if getattr(module, "bias", None) is not None:
        pieces["bias"] = Dense(summed.view(n, *weight.shape))
    return pieces


@register_ghost_rule(nn.LayerNorm)
def _layer_norm(module: nn.LayerNorm, inputs: torch.Tensor, output_grads: torch.Tensor) -> dict[str, Piece]:
    normalised = F.layer_norm(_wide(inputs), module.normalized_shape, eps=module.eps)
    return _affine_pieces(module, normalised, _wide(output_grads), channel_dim=-1)


@register_ghost_rule(nn.GroupNorm)
def _group_norm(module: nn.GroupNorm, inputs: torch.Tensor, output_grads: torch.Tensor) -> dict[str, Piece]:
    normalised = F.group_norm(_wide(inputs), module.num_groups, eps=module.eps)
    return _affine_pieces(module, normalised, _wide(output_grads), channel_dim=1)


def _batch_norm_check(module: nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d) -> str | None:
    if module.running_mean is None or module.running_var is None:
        return f"{type(module).__name__} without running statistics (its output mixes the samples of a batch)"
    return None


@register_ghost_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, check=_batch_norm_check)
def _batch_norm(
    module: nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d, inputs: torch.Tensor, output_grads: torch.Tensor
) -> dict[str, Piece]:
    if module.training:
        raise RuntimeError("the ghost engine evaluates BatchNorm in eval mode; call it through ghost_span")
    if module.running_mean is None or module.running_var is None:
        raise RuntimeError(_batch_norm_check(module))
    shape = (1, -1) + (1,) * (inputs.dim() - 2)
    mean, var = module.running_mean.view(shape), module.running_var.view(shape)
    normalised = (_wide(inputs) - mean) / torch.sqrt(var + module.eps)
    return _affine_pieces(module, normalised, _wide(output_grads), channel_dim=1)


@register_ghost_rule(nn.RMSNorm)
def _rms_norm(module: nn.RMSNorm, inputs: torch.Tensor, output_grads: torch.Tensor) -> dict[str, Piece]:
    normalised = F.rms_norm(_wide(inputs), module.normalized_shape, eps=module.eps)
    return _affine_pieces(module, normalised, _wide(output_grads), channel_dim=-1)


def is_transformers_rms_norm(module: nn.Module) -> bool:
    """A transformers RMSNorm (``LlamaRMSNorm`` and kin): one input, a 1-D ``weight``, an epsilon, no bias.

    Its output is ``weight * x / rms(x)`` (Gemma's ``(1 + weight) * x / rms(x)`` has the same weight gradient).
    """
    cls = type(module)
    if not cls.__module__.startswith("transformers.") or not cls.__name__.endswith("RMSNorm"):
        return False
    weight = getattr(module, "weight", None)
    one_input = len(inspect.signature(cls.forward).parameters) == 2  # (self, hidden_states): no gate
    has_eps = isinstance(getattr(module, "variance_epsilon", getattr(module, "eps", None)), float)
    return (
        one_input
        and has_eps
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and getattr(module, "bias", None) is None
    )


@register_ghost_matcher(is_transformers_rms_norm)
def _transformers_rms_norm(module: nn.Module, inputs: torch.Tensor, output_grads: torch.Tensor) -> dict[str, Piece]:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    normalised = F.rms_norm(_wide(inputs), (module.get_parameter("weight").shape[0],), eps=eps)
    return _affine_pieces(module, normalised, _wide(output_grads), channel_dim=-1)
