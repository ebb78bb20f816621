"""The OrthoGrad update direction from a forget gradient and any retain span: one guard, one solve, one combine.

Steps 3 and 4 of Algorithm 1, whatever holds the retain gradients ``G`` (a ``RetainSpan``, ``span.py``:
materialised, ghost or data-parallel). If the forget gradient ``g`` or the span's ``G G^T`` or ``G g`` is not
finite there is no direction. Else the coefficients ``c`` of ``g``'s projection onto span(G) come from one float64
eigen-solve of the ``k x k`` Gram system (``gram_coefficients``, cut-off ``default_rcond`` of ``g``'s dtype), and
the direction is ``retain_weight * mean(G) - forget_weight * (g - G^T c)``: ``alpha`` and ``1 - alpha`` as in
Algorithm 1, or, ``normalized``, the same shares of both terms scaled to unit norm (so that ``alpha`` is the retain
share of the update whatever the gradients' norms). A pure function of its arguments: the caller decides alpha.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from orthograd.geometry import default_rcond, gram_coefficients
from orthograd.methods.orthograd.span import RetainSpan, grad_norm

_TINY = 1e-30


@dataclass(frozen=True)
class Direction:
    """The descent direction per parameter and the norms the step statistics report.

    norms: ``forget`` (``|g|``), ``orthogonal`` (``|g_perp|``) and ``retain`` (``|mean(G)|``).
    """

    update: dict[str, torch.Tensor]
    norms: dict[str, float]


def orthograd_direction(
    *, forget_grad: Mapping[str, torch.Tensor], span: RetainSpan, alpha: float, normalized: bool
) -> Direction | None:
    """``retain_weight * mean(G) - forget_weight * g_perp`` for the forget gradient and retain span of one step.

    ``alpha``: the retain term's share; ``normalized``: scale both terms to unit norm before mixing (the adaptive
    and normalized schedules) rather than mix the raw gradients (the fixed schedule). Returns None when a gradient
    is not finite (no step can be taken; the caller reports it).
    """
    forget_norm = grad_norm(forget_grad)
    if not (math.isfinite(forget_norm) and _finite(span.gram) and _finite(span.product)):
        return None
    dtype = next(iter(forget_grad.values())).dtype
    coeffs = gram_coefficients(span.gram, span.product, rcond=default_rcond(dtype))
    retain_norm, orthogonal_norm = span.norms(coeffs, probe_norm=forget_norm)
    retain_weight, forget_weight = alpha, 1.0 - alpha
    if normalized:
        retain_weight /= max(retain_norm, _TINY)
        forget_weight /= max(orthogonal_norm, _TINY)
    update = span.update(forget_grad, coeffs, mean_weight=retain_weight, residual_weight=forget_weight)
    norms = {"forget": forget_norm, "orthogonal": orthogonal_norm, "retain": retain_norm}
    return Direction(update=update, norms=norms)


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())
