"""A user's own layer type gets ghost per-sample gradients by registering a rule, as opacus' register_grad_sampler."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orthograd.grads import Dense, Outer, per_sample_grads, prefer_ghost, register_ghost_rule
from orthograd.grads.ghost import ghost_span, unsupported_reason


class FeatureScale(nn.Module):
    """``y = x * weight + bias`` over the last dimension: a layer type the library has no rule for."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, features))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


class PlainProjection(nn.Module):
    """``y = x W^T`` with its own weight (not an ``nn.Linear``, so no built-in rule applies)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(PlainProjection(6, 5), nn.Tanh(), FeatureScale(5), nn.Linear(5, 3)).double()


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(dim=1)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 4, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (7, 4), generator=g)


def _register_rules() -> None:
    @register_ghost_rule(FeatureScale)
    def _feature_scale(module: nn.Module, inputs: torch.Tensor, output_grads: torch.Tensor) -> dict:
        n, d = inputs.shape[0], module.weight.numel()
        return {
            "weight": Dense((inputs * output_grads).reshape(n, -1, d).sum(dim=1)),
            "bias": Dense(output_grads.reshape(n, -1, d).sum(dim=1)),
        }

    @register_ghost_rule(PlainProjection)
    def _projection(module: nn.Module, inputs: torch.Tensor, output_grads: torch.Tensor) -> dict:
        d_out, d_in = module.weight.shape
        grads = output_grads.reshape(inputs.shape[0], -1, d_out)
        weight = Outer(
            inputs=inputs,
            rows=lambda x: x.reshape(x.shape[0], -1, d_in),
            grads=grads,
            shape=module.weight.shape,
            ghost=prefer_ghost(positions=grads.shape[1], d_in=d_in, d_out=d_out),
        )
        return {"weight": weight}


def test_registered_rules_give_the_reference_per_sample_gram() -> None:
    model, batch = _model(), _batch()
    assert "no ghost rule for PlainProjection" in (unsupported_reason(model) or "")
    _register_rules()
    assert unsupported_reason(model) is None
    reference = per_sample_grads(model, _loss, batch, engine="loop")  # one backward per sample
    G = torch.cat([g.flatten(1) for g in reference.values()], dim=1)
    probe = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    flat_probe = torch.cat([probe[name].flatten() for name in reference])

    span = ghost_span(model, _loss, batch, probe=probe, chunk_size=3)

    torch.testing.assert_close(span.gram.diagonal().sqrt(), G.norm(dim=1))  # per-sample norms
    torch.testing.assert_close(span.gram, G @ G.T)
    torch.testing.assert_close(span.product, G @ flat_probe)
    weights = torch.rand(1, G.shape[0], dtype=torch.float64)
    (combined,) = span.combine(weights)
    torch.testing.assert_close(torch.cat([combined[n].flatten() for n in reference]), (weights @ G)[0])
