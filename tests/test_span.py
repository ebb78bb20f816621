"""The retain-span protocol: one direction (one guard, one solve, one combine) whatever holds the retain gradients.

The materialised span (torch.func's per-sample gradients) under every projection solver and the ghost span give
the same direction and norms on one float64 problem (``span_helpers``; the data-parallel span is checked against
the same problem in ``test_distributed.py``), and a non-finite forget gradient or retain sample stops every span.
"""

from __future__ import annotations

import pytest
import torch
from span_helpers import ADAPTIVE_MIX, flat, loss_fn, problem

from orthograd import geometry
from orthograd.geometry import default_rcond, gram_coefficients, project_out
from orthograd.grads import per_sample_grads_and_losses
from orthograd.grads.ghost import GhostSpan, ghost_span
from orthograd.methods.orthograd.direction import orthograd_direction
from orthograd.methods.orthograd.span import MaterialisedSpan, RetainSpan

SPANS = ["materialised_auto", "materialised_gram", "materialised_qr", "ghost"]


def _span(kind: str, model: torch.nn.Module, probe: dict[str, torch.Tensor], batch: tuple) -> RetainSpan:
    if kind == "ghost":
        return ghost_span(model, loss_fn, batch, probe=probe)
    per_sample, losses = per_sample_grads_and_losses(model, loss_fn, batch, engine="loop")
    return MaterialisedSpan(per_sample, probe, retain_loss=float(losses.mean()), projection=kind.split("_")[1])


def test_every_span_gives_the_same_direction_and_norms():
    model, forget_grad, batch = problem()
    results = {}
    for kind in SPANS:
        span = _span(kind, model, forget_grad, batch)
        direction = orthograd_direction(forget_grad=forget_grad, span=span, **ADAPTIVE_MIX)
        assert direction is not None
        results[kind] = (flat(direction.update), direction.norms, span.retain_loss)
    reference, norms, retain_loss = results["materialised_qr"]  # Algorithm 1 literally
    assert 0.05 < norms["orthogonal"] / norms["forget"] < 0.999  # the projection removed a real part
    for kind, (update, kind_norms, kind_loss) in results.items():
        assert float((update - reference).norm() / reference.norm()) <= 1e-9, kind
        assert kind_norms == pytest.approx(norms, rel=1e-9), kind
        assert kind_loss == pytest.approx(retain_loss, rel=1e-12), kind


def test_fixed_weights_give_algorithm_1_from_the_gram_solve():
    """alpha * mean(G) - (1 - alpha) * (g - P g), P the projection onto the retain rows, by hand."""
    model, forget_grad, batch = problem()
    per_sample, losses = per_sample_grads_and_losses(model, loss_fn, batch, engine="loop")
    G = torch.cat([g.reshape(g.shape[0], -1) for g in per_sample.values()], dim=1)
    g = flat(forget_grad)
    projection = G.T @ torch.linalg.lstsq(G.T, g).solution
    expected = 0.8 * G.mean(dim=0) - 0.2 * (g - projection)
    span = MaterialisedSpan(per_sample, forget_grad, retain_loss=float(losses.mean()), projection="gram")
    direction = orthograd_direction(forget_grad=forget_grad, span=span, alpha=0.8, normalized=False)
    assert direction is not None
    torch.testing.assert_close(flat(direction.update), expected, rtol=1e-9, atol=1e-12)


def test_the_normalized_mix_takes_alpha_of_each_unit_norm_term():
    """alpha * mean(G) / |mean(G)| - (1 - alpha) * g_perp / |g_perp|, by hand, with the norms it reports."""
    model, forget_grad, batch = problem()
    per_sample, losses = per_sample_grads_and_losses(model, loss_fn, batch, engine="loop")
    G = torch.cat([g.reshape(g.shape[0], -1) for g in per_sample.values()], dim=1)
    g = flat(forget_grad)
    residual = g - G.T @ torch.linalg.lstsq(G.T, g).solution
    mean = G.mean(dim=0)
    expected = 0.3 * mean / mean.norm() - 0.7 * residual / residual.norm()
    span = MaterialisedSpan(per_sample, forget_grad, retain_loss=float(losses.mean()), projection="gram")
    direction = orthograd_direction(forget_grad=forget_grad, span=span, **ADAPTIVE_MIX)
    assert direction is not None
    torch.testing.assert_close(flat(direction.update), expected, rtol=1e-8, atol=1e-12)
    assert direction.norms["retain"] == pytest.approx(float(mean.norm()), rel=1e-9)
    assert direction.norms["orthogonal"] == pytest.approx(float(residual.norm()), rel=1e-6)


@pytest.mark.parametrize("kind", SPANS)
@pytest.mark.parametrize("where", ["forget_gradient", "retain_sample"])
def test_the_non_finite_guard_stops_every_span(kind, where):
    model, forget_grad, batch = problem(nan_retain_sample=where == "retain_sample")
    if where == "forget_gradient":
        forget_grad = {n: g.clone() for n, g in forget_grad.items()}
        next(iter(forget_grad.values())).view(-1)[0] = float("inf")
    span = _span(kind, model, forget_grad, batch)
    assert orthograd_direction(forget_grad=forget_grad, span=span, **ADAPTIVE_MIX) is None


def test_a_ghost_span_is_a_retain_span_and_frees_its_pieces_after_the_update():
    model, forget_grad, batch = problem()
    span = ghost_span(model, loss_fn, batch, probe=forget_grad)
    assert isinstance(span, GhostSpan)
    assert orthograd_direction(forget_grad=forget_grad, span=span, **ADAPTIVE_MIX) is not None
    assert span.pieces is None  # one contraction, then the layer inputs and output gradients are released


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("projection", ["auto", "gram", "qr"])
def test_materialised_residual_is_project_outs_bit_for_bit(projection, scope, monkeypatch):
    """Float32 rows, near rank 2 and of very different norms: the Gram solve's residual is not orthogonal to
    working precision, so "auto" falls back to QR here, in the span as in ``project_out``."""
    qr_calls = []
    qr = geometry._project_qr
    monkeypatch.setattr(geometry, "_project_qr", lambda *args: qr_calls.append(1) or qr(*args))
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(8, 2, generator=gen) @ torch.randn(2, 60, generator=gen) + 1e-3 * torch.randn(8, 60, generator=gen)
    G[0] *= 1e4
    rows = {"weight": G[:, :48].reshape(8, 6, 8), "bias": G[:, 48:]}
    probe = {"weight": torch.randn(6, 8, generator=gen), "bias": torch.randn(12, generator=gen)}
    span = MaterialisedSpan(rows, probe, retain_loss=0.0, projection=projection, scope=scope)
    coeffs = gram_coefficients(span.gram, span.product, rcond=default_rcond(torch.float32))
    residual = span.update(probe, coeffs, mean_weight=0.0, residual_weight=-1.0)  # 0 * mean(G) + residual, exactly
    expected = project_out(probe, rows, method=projection, scope=scope)
    assert all(torch.equal(residual[n], expected[n]) for n in probe)
    if projection == "auto" and scope == "global":
        assert len(qr_calls) == 2  # the fallback ran, once in the span and once in project_out
