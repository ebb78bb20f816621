"""Projection of a gradient onto the orthogonal complement of a set of gradients.

Pure tensor math, no ``nn.Module`` knowledge. This is the heart of OrthoGrad (Algorithm 1 of the paper):
the forget gradient ``g`` loses every component that lies in the span of the per-sample retain gradients
(the rows of ``G``), so a small step along the result leaves every retain loss unchanged to first order.

Two solvers give the same answer:

* ``"qr"``: Algorithm 1 literally, a reduced QR of ``G^T`` (a ``d x k`` basis). Rank-deficient ``G`` is handled
  exactly by keeping only the range of ``R`` (an SVD of the small ``k x k`` factor).
* ``"gram"``: never builds a ``d x k`` basis. It solves the ``k x k`` Gram system ``(G G^T) c = G g`` in float64
  with an eigenvalue cut-off for dependent rows, then returns ``g - G^T c``. Same result, far less memory.
* ``"auto"``: the Gram solve, checked by its orthogonality residual; an ill-conditioned ``G`` that the Gram solve
  cannot resolve to working precision falls back to QR.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, overload

import torch

from orthograd.choices import check_choice, choices

ProjectionMethod = Literal["auto", "qr", "gram"]
ProjectionScope = Literal["global", "per_tensor"]
PROJECTION_METHODS: tuple[str, ...] = choices(ProjectionMethod)
PROJECTION_SCOPES: tuple[str, ...] = choices(ProjectionScope)

_GRAM_CHUNK = 1 << 22  # columns of G upcast to float64 at a time (bounds the extra memory)


@overload
def project_out(
    g: torch.Tensor,
    G: torch.Tensor,
    *,
    method: ProjectionMethod = ...,
    scope: ProjectionScope = ...,
    rcond: float | None = ...,
) -> torch.Tensor: ...


@overload
def project_out(
    g: Mapping[str, torch.Tensor],
    G: Mapping[str, torch.Tensor],
    *,
    method: ProjectionMethod = ...,
    scope: ProjectionScope = ...,
    rcond: float | None = ...,
) -> dict[str, torch.Tensor]: ...


def project_out(
    g: torch.Tensor | Mapping[str, torch.Tensor],
    G: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    method: ProjectionMethod = "auto",
    scope: ProjectionScope = "global",
    rcond: float | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Return ``g`` minus its orthogonal projection onto the span of the rows of ``G``.

    ``g`` is a vector ``[d]`` and ``G`` a matrix ``[k, d]``; or both are dicts keyed by parameter name, with
    ``g[name]`` of the parameter's shape and ``G[name]`` of shape ``[k, *shape]`` (what ``per_sample_grads``
    returns). ``scope="global"`` treats the dict as one concatenated vector (Algorithm 1 over all trainable
    parameters); ``scope="per_tensor"`` projects each tensor on its own (the variant in the code found online,
    under which a tensor with no more entries than ``k`` gets no forget component at all).

    ``rcond`` is the relative singular-value cut-off below which a direction of ``G`` counts as dependent; by
    default ten machine epsilons of the input dtype. The result has the dtype and device of ``g``.
    """
    check_choice("method", method, ProjectionMethod)
    check_choice("scope", scope, ProjectionScope)
    if isinstance(g, Mapping):
        if not isinstance(G, Mapping) or set(G) != set(g):
            raise ValueError("g and G must be dicts with the same keys when g is a dict of per-parameter tensors")
        if scope == "per_tensor":
            return {
                name: _project_flat(g[name].reshape(-1), G[name].reshape(G[name].shape[0], -1), method, rcond).view_as(
                    g[name]
                )
                for name in g
            }
        names = list(g)
        flat = _project_flat(
            torch.cat([g[n].reshape(-1) for n in names]),
            torch.cat([G[n].reshape(G[n].shape[0], -1) for n in names], dim=1),
            method,
            rcond,
        )
        return dict(zip(names, _split_like(flat, [g[n] for n in names]), strict=True))
    if isinstance(G, Mapping):
        raise ValueError("G is a dict but g is a tensor: pass both as dicts or both as tensors")
    if g.dim() != 1 or G.dim() != 2 or G.shape[1] != g.shape[0]:
        raise ValueError(f"expected g of shape [d] and G of shape [k, d]; got {tuple(g.shape)} and {tuple(G.shape)}")
    return _project_flat(g, G, method, rcond)


def _split_like(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [t.numel() for t in like]
    return [part.view_as(t) for part, t in zip(torch.split(flat, sizes), like, strict=True)]


def default_rcond(dtype: torch.dtype) -> float:
    """The default relative singular-value cut-off for gradients of ``dtype``: ten machine epsilons."""
    return 10.0 * torch.finfo(dtype).eps


def _project_flat(g: torch.Tensor, G: torch.Tensor, method: str, rcond: float | None) -> torch.Tensor:
    if G.shape[0] == 0:
        return g.clone()
    cutoff = default_rcond(torch.promote_types(g.dtype, G.dtype)) if rcond is None else rcond
    if method == "qr":
        return _project_qr(g, G, cutoff)
    gram, Gg = gram_and_product(G, g)
    result = _project_gram(g, G, gram, Gg, cutoff)
    if method == "gram" or is_orthogonal(result, G, gram, g):
        return result
    return _project_qr(g, G, cutoff)


def _project_qr(g: torch.Tensor, G: torch.Tensor, rcond: float) -> torch.Tensor:
    """Algorithm 1: orthonormal basis of span(G) by reduced QR, then g - Q Q^T g."""
    work = torch.float64 if g.dtype == torch.float64 else torch.float32
    A = G.to(work).T  # [d, k]
    Q, R = torch.linalg.qr(A, mode="reduced")
    # Q spans a superset of range(A) when A is rank deficient; range(A) = Q range(R), and range(R) comes from
    # the SVD of the small k x k (or d x d) factor.
    U, S, _ = torch.linalg.svd(R.double())
    if S.numel() == 0 or S.max() <= 0:
        return g.clone()
    basis = Q @ U[:, S > rcond * S.max()].to(work)
    gw = g.to(work)
    return (gw - basis @ (basis.T @ gw)).to(g.dtype)


def _project_gram(
    g: torch.Tensor, G: torch.Tensor, gram: torch.Tensor, Gg: torch.Tensor, rcond: float
) -> torch.Tensor:
    """Solve (G G^T) c = G g in float64 with an eigenvalue cut-off; return g - G^T c."""
    return subtract_combination(g, G, gram_coefficients(gram, Gg, rcond=rcond))


def gram_coefficients(gram: torch.Tensor, Gg: torch.Tensor, *, rcond: float) -> torch.Tensor:
    """Coefficients c with G^T c the projection of g onto span(rows of G), from ``gram = G G^T`` and ``Gg = G g``.

    Solves the k x k system in float64 by an eigen-decomposition; eigenvalues below ``rcond**2`` times the largest
    (dependent retain gradients) are dropped. Engines that never form ``G`` (layer-wise Gram blocks) use this too.
    """
    gram, Gg = gram.double(), Gg.double()
    eigvals, eigvecs = torch.linalg.eigh(gram)
    top = eigvals.max()
    if top <= 0:
        return torch.zeros_like(Gg)
    keep = eigvals > (rcond**2) * top
    inverse = torch.where(keep, 1.0 / torch.where(keep, eigvals, torch.ones_like(eigvals)), torch.zeros_like(eigvals))
    return eigvecs @ (inverse * (eigvecs.T @ Gg))


def gram_and_product(G: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``G G^T`` ([k, k]) and ``G g`` ([k]) of ``G`` ([k, d]) and ``g`` ([d]), accumulated in float64 over column
    chunks, so no float64 copy of G is held."""
    k, d = G.shape
    gram = torch.zeros(k, k, dtype=torch.float64, device=G.device)
    Gg = torch.zeros(k, dtype=torch.float64, device=G.device)
    for start in range(0, d, _GRAM_CHUNK):
        block = G[:, start : start + _GRAM_CHUNK].double()
        gram += block @ block.T
        Gg += block @ g[start : start + _GRAM_CHUNK].double()
    return gram, Gg


def subtract_combination(g: torch.Tensor, G: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``g - G^T coeffs`` (``coeffs``: [k], e.g. from ``gram_coefficients``), computed in float64 chunk by chunk and
    returned in g's dtype."""
    out = torch.empty_like(g)
    d = g.shape[0]
    for start in range(0, d, _GRAM_CHUNK):
        stop = min(start + _GRAM_CHUNK, d)
        out[start:stop] = (g[start:stop].double() - G[:, start:stop].double().T @ coeffs).to(g.dtype)
    return out


def is_orthogonal(result: torch.Tensor, G: torch.Tensor, gram: torch.Tensor, g: torch.Tensor) -> bool:
    """True when every row of G is orthogonal to ``result`` (g's projection, ``gram = G G^T``) to the working
    precision of the inputs; ``project_out(method="auto")`` falls back to QR when it is not."""
    tol = 100.0 * torch.finfo(torch.promote_types(g.dtype, G.dtype)).eps
    _, residual = gram_and_product(G, result)
    scale = gram.diagonal().clamp_min(0).sqrt() * g.double().norm()
    return bool((residual.abs() <= tol * scale).all())
