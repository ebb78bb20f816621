"""OrthoGrad as Algorithm 1: the update direction, its sign, and the paper's first-order claim."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import orthograd as og
from orthograd.methods import make_config
from orthograd.methods.orthograd.config import OrthoGradConfig


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def _data(seed, n, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen).to(dtype), torch.randint(0, 3, (n,), generator=gen)


def _losses(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def _one_step(model, forget, retain, **kwargs):
    """One full-batch step of a method with all parameters trainable; returns the new model."""
    result = og.unlearn(
        model,
        TensorDataset(*forget),
        TensorDataset(*retain),
        max_epochs=1,
        lora=None,
        schedule="fixed",  # Algorithm 1 as written
        forget_batch_size=len(forget[0]),
        retain_batch_size=len(retain[0]),
        **kwargs,
    )
    assert result.steps == 1
    return result.model


def test_first_order_retain_loss_change_is_zero():
    """alpha = 0: retain losses change by O(lr^2); a NegGrad step (no projection) changes them by O(lr)."""
    model, forget, retain = _mlp(torch.float64), _data(1, 8, torch.float64), _data(2, 5, torch.float64)
    before = _losses(model, *retain)
    forget_before = _losses(model, *forget).mean()
    ortho, plain = [], []
    for lr in (1e-1, 1e-2):
        after = _one_step(model, forget, retain, alpha=0.0, lr=lr, projection="qr")
        ortho.append((_losses(after, *retain) - before).abs().max().item())
        assert _losses(after, *forget).mean() > forget_before  # ascent on the forget loss
        neg = copy.deepcopy(model)
        loss = F.cross_entropy(neg(forget[0]), forget[1])
        grads = torch.autograd.grad(loss, list(neg.parameters()))
        with torch.no_grad():
            for p, g in zip(neg.parameters(), grads, strict=True):
                p.add_(lr * g)
        plain.append((_losses(neg, *retain) - before).abs().max().item())
    assert ortho[1] < ortho[0] / 50  # quadratic: 10x smaller lr -> ~100x smaller change
    assert plain[1] > plain[0] / 20  # linear: 10x smaller lr -> ~10x smaller change
    assert ortho[1] < plain[1] / 100


def test_update_equals_algorithm_1_direction():
    """theta <- theta - lr * (alpha * mean_r - (1 - alpha) * g_u_perp), computed by hand with QR."""
    model, forget, retain = _mlp(), _data(3, 6), _data(4, 4)
    alpha, lr = 0.7, 0.05
    params = list(model.parameters())
    g_u = torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(forget[0]), forget[1]), params)])
    rows = []
    for i in range(4):
        loss = F.cross_entropy(model(retain[0][i : i + 1]), retain[1][i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    G = torch.stack(rows).double()
    Q, _ = torch.linalg.qr(G.T)
    g_perp = g_u.double() - Q @ (Q.T @ g_u.double())
    direction = alpha * G.mean(0) - (1 - alpha) * g_perp
    expected = torch.cat([p.detach().reshape(-1) for p in params]).double() - lr * direction
    after = _one_step(model, forget, retain, alpha=alpha, lr=lr)
    got = torch.cat([p.detach().reshape(-1) for p in after.parameters()]).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_mean_ablation_projects_against_mean_retain_gradient_only():
    model, forget, retain = _mlp(torch.float64), _data(5, 6, torch.float64), _data(6, 4, torch.float64)
    params = list(model.parameters())
    mean_grad = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(retain[0]), retain[1]), params)]
    )
    after = _one_step(model, forget, retain, alpha=0.0, lr=1e-3, retain_grads="mean")
    delta = torch.cat([(a.detach() - p.detach()).reshape(-1) for a, p in zip(after.parameters(), params, strict=True)])
    assert abs(torch.dot(delta, mean_grad)) < 1e-9 * delta.norm() * mean_grad.norm()
    per_sample = _one_step(model, forget, retain, alpha=0.0, lr=1e-3)
    pairs = zip(per_sample.parameters(), params, strict=True)
    delta_ps = torch.cat([(a.detach() - p.detach()).reshape(-1) for a, p in pairs])
    assert (delta - delta_ps).norm() > 1e-3 * delta.norm()  # the two ablations really differ


def _flat_delta(after, model) -> torch.Tensor:
    pairs = zip(after.parameters(), model.parameters(), strict=True)
    return torch.cat([(a.detach() - p.detach()).reshape(-1) for a, p in pairs])


def test_adam_first_step_moves_every_entry_by_lr_along_the_sgd_direction():
    """Adam's first step is -lr * d / (|d| + eps) per entry: the SGD step's signs, each entry moved by ~lr."""
    model, forget, retain = _mlp(), _data(7, 6), _data(8, 4)
    lr = 1e-2
    adam = _flat_delta(_one_step(model, forget, retain, alpha=0.5, lr=lr, optimizer="adam"), model)
    sgd = _flat_delta(_one_step(model, forget, retain, alpha=0.5, lr=lr), model)
    moved = sgd.abs() > 1e-6  # entries whose direction is well above Adam's eps
    assert moved.float().mean() > 0.9
    torch.testing.assert_close(adam[moved].abs(), torch.full_like(adam[moved], lr), rtol=1e-3, atol=0.0)
    assert torch.equal(torch.sign(adam[moved]), torch.sign(sgd[moved]))


def test_per_tensor_scope_projects_each_tensor_against_its_own_retain_gradients():
    """alpha = 0, SGD: each tensor's update is orthogonal to every retain sample's gradient of that tensor."""
    model, forget, retain = _mlp(torch.float64), _data(7, 6, torch.float64), _data(8, 4, torch.float64)
    after = _one_step(model, forget, retain, alpha=0.0, lr=1e-2, projection_scope="per_tensor")
    per_sample = og.per_sample_grads(
        model, lambda m, batch: F.cross_entropy(m(batch[0]), batch[1], reduction="none"), retain
    )
    global_delta = _flat_delta(_one_step(model, forget, retain, alpha=0.0, lr=1e-2), model)
    for (name, param), new in zip(model.named_parameters(), after.parameters(), strict=True):
        delta = (new.detach() - param.detach()).reshape(-1)
        rows = per_sample[name].reshape(len(retain[0]), -1)
        assert delta.norm() > 0 or rows.shape[0] >= delta.numel()  # a tensor smaller than the batch gets nothing
        assert (rows @ delta).abs().max() <= 1e-9 * max(float(delta.norm()), 1e-30) * float(rows.norm())
    assert (_flat_delta(after, model) - global_delta).norm() > 1e-3 * global_delta.norm()  # not the global step


def test_config_validation_and_round_trip():
    cfg = make_config("orthograd", {"schedule": "fixed", "alpha": 0.8, "lora": {"r": 4}})
    assert isinstance(cfg, OrthoGradConfig) and cfg.lora.r == 4
    again = OrthoGradConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        make_config("orthograd", {"alpah": 0.8})
    with pytest.raises(ValueError, match="alpha must be in"):
        OrthoGradConfig(alpha=1.5)
    with pytest.raises(ValueError, match="retain_grads"):
        OrthoGradConfig(retain_grads="batch")
    with pytest.raises(ValueError, match="unknown LoRA settings"):
        make_config("orthograd", {"lora": {"rank": 4}})
