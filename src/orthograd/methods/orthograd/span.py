"""The retain span: what the OrthoGrad direction needs of the per-sample retain gradients ``G`` ([k, d]).

OrthoGrad's update ``alpha * mean(G) - (1 - alpha) * (g - G^T c)`` needs, of ``G``, only its Gram matrix ``G G^T``,
its product ``G g`` with the forget gradient ``g`` (the probe), and, once the coefficients ``c`` of ``g``'s
projection are solved from those two, the norms of both terms and their weighted sum. ``RetainSpan`` is that
interface. Three implementations: ``MaterialisedSpan`` (``G`` as torch.func returns it, below), ``GhostSpan``
(``grads/ghost.py``: layer-wise Gram blocks, never ``G``) and ``DataParallelSpan`` (``distributed/orthograd.py``:
row shards of ``G`` on every rank, all-reduced). ``direction.py`` computes the direction from any of them.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Protocol

import torch

from orthograd.geometry import (
    ProjectionMethod,
    ProjectionScope,
    gram_and_product,
    is_orthogonal,
    project_out,
    subtract_combination,
)


class RetainSpan(Protocol):
    """The per-sample retain gradients ``G`` ([k, d]) of one retain batch, and the probe ``g`` they were given.

    ``gram`` (``G G^T``, [k, k]) and ``product`` (``G g``, [k]) are float64; ``retain_loss`` is the batch's mean
    retain loss. ``norms`` and ``update`` take the projection coefficients ``c`` solved from ``gram`` and
    ``product``; call ``norms`` first, then ``update`` once (an implementation may free ``G``'s pieces there).
    """

    @property
    def gram(self) -> torch.Tensor: ...

    @property
    def product(self) -> torch.Tensor: ...

    @property
    def retain_loss(self) -> float: ...

    def norms(self, coeffs: torch.Tensor, *, probe_norm: float) -> tuple[float, float]:
        """``|mean(G)|`` and ``|g - G^T c|`` (``probe_norm`` is ``|g|``)."""
        ...

    def update(
        self, probe: Mapping[str, torch.Tensor], coeffs: torch.Tensor, *, mean_weight: float, residual_weight: float
    ) -> dict[str, torch.Tensor]:
        """``mean_weight * mean(G) - residual_weight * (g - G^T c)`` per parameter, in ``probe``'s dtypes."""
        ...


def grad_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """Euclidean norm of all tensors together: a norm of per-tensor norms, with no float64 copy of the tensors.

    NaN or inf exactly when some entry is (or when it overflows), so it doubles as a finiteness check. The
    per-tensor norms are one ``torch._foreach_norm`` call per device and dtype (one fused kernel on a GPU, as
    ``clip_grad_norm_`` does), not one norm and one cast per tensor.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors.values():
        groups.setdefault((t.device, t.dtype), []).append(t.detach())
    norms = torch.cat([torch.stack(torch._foreach_norm(group)).double() for group in groups.values()])
    return float(torch.linalg.vector_norm(norms))


Terms = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]  # mean(G) and the residual g - G^T c, per parameter


class ExplicitSpan(abc.ABC):
    """A span whose two terms are formed as tensors (``_terms``), once per coefficient vector, for norms and update.

    The materialised and the data-parallel spans hold ``G`` (or a shard of it) and so can form ``mean(G)`` and
    ``g - G^T c``; the ghost span instead gets both norms from the k x k system and the update in one contraction.
    """

    _cached: tuple[torch.Tensor, Terms] | None = None

    @abc.abstractmethod
    def _terms(self, coeffs: torch.Tensor) -> Terms:
        """``mean(G)`` and ``g - G^T coeffs`` per parameter."""

    def _terms_for(self, coeffs: torch.Tensor) -> Terms:
        if self._cached is None or self._cached[0] is not coeffs:
            self._cached = (coeffs, self._terms(coeffs))
        return self._cached[1]

    def norms(self, coeffs: torch.Tensor, *, probe_norm: float) -> tuple[float, float]:
        """The norms of the formed terms (``probe_norm`` is not needed: the residual is a tensor here)."""
        retain_mean, residual = self._terms_for(coeffs)
        return grad_norm(retain_mean), grad_norm(residual)

    def update(
        self, probe: Mapping[str, torch.Tensor], coeffs: torch.Tensor, *, mean_weight: float, residual_weight: float
    ) -> dict[str, torch.Tensor]:
        retain_mean, residual = self._terms_for(coeffs)
        return {n: mean_weight * retain_mean[n].to(p.dtype) - residual_weight * residual[n] for n, p in probe.items()}


class MaterialisedSpan(ExplicitSpan):
    """``G`` held as per-sample gradients (``{name: [k, *shape]}``, what torch.func returns) on this process.

    ``projection`` and ``scope`` are ``project_out``'s: with ``"gram"`` the residual is ``g - G^T c`` from the
    caller's coefficients; ``"auto"`` checks that residual's orthogonality and falls back to QR (an ill-conditioned
    ``G``); ``"qr"`` (Algorithm 1 literally) and ``scope="per_tensor"`` (the code found online) form the residual
    their own way from ``G`` and leave the coefficients unused.
    """

    def __init__(
        self,
        per_sample: Mapping[str, torch.Tensor],
        probe: Mapping[str, torch.Tensor],
        *,
        retain_loss: float,
        projection: ProjectionMethod = "auto",
        scope: ProjectionScope = "global",
    ) -> None:
        self.per_sample, self.probe = dict(per_sample), dict(probe)
        self.projection, self.scope = projection, scope
        self.retain_loss = retain_loss
        names = list(self.probe)
        self._rows = torch.cat([self.per_sample[n].reshape(self.per_sample[n].shape[0], -1) for n in names], dim=1)
        self._flat_probe = torch.cat([self.probe[n].reshape(-1) for n in names])
        self.gram, self.product = gram_and_product(self._rows, self._flat_probe)

    def _terms(self, coeffs: torch.Tensor) -> Terms:
        return {n: g.mean(dim=0) for n, g in self.per_sample.items()}, self._residual(coeffs)

    def _residual(self, coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.projection == "qr" or self.scope == "per_tensor":
            return project_out(self.probe, self.per_sample, method=self.projection, scope=self.scope)
        g, G = self._flat_probe, self._rows
        flat = subtract_combination(g, G, coeffs)
        if self.projection == "auto" and not is_orthogonal(flat, G, self.gram, g):
            flat = project_out(g, G, method="qr")
        parts = torch.split(flat, [t.numel() for t in self.probe.values()])
        return {n: part.view_as(t) for (n, t), part in zip(self.probe.items(), parts, strict=True)}
