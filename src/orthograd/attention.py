"""``nn.MultiheadAttention`` with its projections as ``nn.Linear`` modules, so LoRA on them stays visible.

peft's LoRA on ``nn.MultiheadAttention`` (torchvision ViT's attention, the paper's ViT setting) merges the factors
into ``in_proj_weight`` inside the forward instead of calling them as modules, which defeats both torch.func
(peft mutates ``.data``) and the ghost engine (the factors never run). ``ProjectedAttention`` computes exactly what
``nn.MultiheadAttention`` computes, but calls its packed input projection ``in_proj`` and its ``out_proj`` as
``nn.Linear`` modules, once per forward and with the sample dimension first; LoRA on those two linears has the
same parameters as peft's LoRA on the attention module. ``expose_projections`` swaps the modules in before LoRA is
attached; ``restore_attention`` swaps plain ``nn.MultiheadAttention`` modules back after the merge, so the user gets
the class and state-dict keys they gave. The tensors are moved, not copied.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class ProjectedAttention(nn.Module):
    """Multi-head attention equal to ``nn.MultiheadAttention`` (same arguments, outputs and defaults).

    Self-attention (``query is key is value``) projects its input once; otherwise query, key and value are
    concatenated along the sequence so that ``in_proj`` still runs once (the unused output blocks get zero
    gradient, so per-sample gradients stay exact).
    """

    def __init__(
        self, *, in_proj: nn.Linear, out_proj: nn.Linear, num_heads: int, dropout: float, batch_first: bool
    ) -> None:
        super().__init__()
        self.in_proj = in_proj
        self.out_proj = out_proj
        self.embed_dim = out_proj.in_features
        self.num_heads = num_heads
        self.head_dim = self.embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first

    @classmethod
    def from_attention(cls, attention: nn.MultiheadAttention) -> ProjectedAttention:
        """The equivalent module, holding the attention's own parameter tensors."""
        dim, bias = attention.embed_dim, attention.in_proj_bias is not None
        in_proj = nn.Linear(dim, 3 * dim, bias=bias, device="meta")
        out_proj = nn.Linear(dim, dim, bias=bias, device="meta")
        in_proj.weight = attention.in_proj_weight
        out_proj.weight = attention.out_proj.weight
        if bias:
            in_proj.bias, out_proj.bias = attention.in_proj_bias, attention.out_proj.bias
        module = cls(
            in_proj=in_proj, out_proj=out_proj, num_heads=attention.num_heads, dropout=attention.dropout,
            batch_first=attention.batch_first,
        )
        return module.train(attention.training)

    def to_attention(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` holding this module's parameter tensors."""
        bias = self.in_proj.bias is not None
        attention = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=bias, batch_first=self.batch_first,
            device="meta",
        )
        # Linear declares its weight a Tensor; it is a Parameter, shared here, not copied
        attention.in_proj_weight = cast(nn.Parameter, self.in_proj.weight)
        attention.out_proj.weight = self.out_proj.weight
        if bias:
            attention.in_proj_bias, attention.out_proj.bias = self.in_proj.bias, self.out_proj.bias
        return attention.train(self.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal needs attn_mask, as in nn.MultiheadAttention (it is only a hint)")
        unbatched = query.dim() == 2
        q_in, k_in, v_in = (t.unsqueeze(0) if unbatched else t if self.batch_first else t.transpose(0, 1)
                            for t in (query, key, value))
        if unbatched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        q, k, v = self._project(q_in, k_in, v_in, same=query is key and key is value)
        n, length_q, length_k = q.shape[0], q.shape[2], k.shape[2]
        mask = _additive_mask(attn_mask, key_padding_mask, n=n, heads=self.num_heads, q=length_q, k=length_k,
                              dtype=q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, p=dropout) @ v if dropout > 0 else weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length_q, self.embed_dim))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, same: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query, key and value heads ``[n, heads, length, head_dim]`` from one call of ``in_proj``."""
        dim = self.embed_dim
        if same:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            lq, lk = query.shape[1], key.shape[1]
            packed = self.in_proj(torch.cat([query, key, value], dim=1))
            q, k, v = packed[:, :lq, :dim], packed[:, lq : lq + lk, dim : 2 * dim], packed[:, lq + lk :, 2 * dim :]
        return tuple(t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    *,
    n: int,
    heads: int,
    q: int,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """``nn.MultiheadAttention``'s masks as one float mask broadcastable to ``[n, heads, q, k]`` (True = masked)."""
    mask = None
    if attn_mask is not None:
        mask = _as_float(attn_mask, dtype)
        mask = mask.view(1, 1, q, k) if mask.dim() == 2 else mask.view(n, heads, q, k)
    if key_padding_mask is not None:
        padding = _as_float(key_padding_mask, dtype).view(n, 1, 1, k)
        mask = padding if mask is None else mask + padding
    return mask


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def swappable(module: nn.Module) -> bool:
    """True for a plain ``nn.MultiheadAttention`` whose projections ``ProjectedAttention`` can express."""
    return (
        type(module) is nn.MultiheadAttention
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
    )


def expose_projections(model: nn.Module, targets: list[str]) -> list[str]:
    """Swap every swappable attention module named by ``targets`` (in place) for a ``ProjectedAttention``.

    A target matches a module named exactly so or ending in ``"." + target`` (peft's rule). Returns the targets
    with each swapped module's name replaced by the full names of its ``in_proj`` and ``out_proj``.
    """
    names = dict(model.named_modules())
    matched = {t: [n for n in names if n and (n == t or n.endswith("." + t))] for t in targets}
    swapped = {n for found in matched.values() for n in found if swappable(names[n])}
    if not swapped:
        return list(targets)
    for name in swapped:
        parent, _, child = name.rpartition(".")
        setattr(names[parent], child, ProjectedAttention.from_attention(names[name]))
    out: list[str] = []
    for target in targets:
        if not any(n in swapped for n in matched[target]):
            out.append(target)
            continue
        for name in matched[target]:
            out.extend([f"{name}.in_proj", f"{name}.out_proj"] if name in swapped else [name])
    return list(dict.fromkeys(out))


def restore_attention(model: nn.Module) -> nn.Module:
    """Replace every ``ProjectedAttention`` in ``model`` (in place) by the equivalent ``nn.MultiheadAttention``."""
    for name, module in list(model.named_modules()):
        if name and isinstance(module, ProjectedAttention):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.to_attention())
    return model
