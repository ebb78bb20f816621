"""One small OrthoGrad step for the retain-span tests: a float64 CNN, a forget gradient and a retain batch.

``tests/test_span.py`` builds the materialised and the ghost span of it; ``tests/test_distributed.py`` the
data-parallel span, its retain rows split over two ranks. All three must give the same direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orthograd.models import SmallCNN

RETAIN, FORGET = 6, 4


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-sample cross-entropy losses."""
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def problem(*, nan_retain_sample: bool = False) -> tuple[nn.Module, dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
    """(model, forget gradient, retain batch); ``nan_retain_sample`` puts a NaN into the last retain sample."""
    torch.manual_seed(0)
    model = SmallCNN(width=4).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(FORGET + RETAIN, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (FORGET + RETAIN,), generator=gen)
    params = dict(model.named_parameters())
    forget_loss = loss_fn(model, (x[:FORGET], y[:FORGET])).mean()
    forget_grad = dict(zip(params, torch.autograd.grad(forget_loss, list(params.values()))))
    retain_x = x[FORGET:].clone()
    if nan_retain_sample:
        retain_x[-1, 0, 0, 0] = float("nan")
    return model, forget_grad, (retain_x, y[FORGET:])


def adaptive_weights(*, retain_norm: float, orthogonal_norm: float) -> tuple[float, float, float]:
    """The adaptive schedule's mix at alpha = 0.3 (each term at unit norm), so the norms matter too."""
    return 0.3, 0.3 / retain_norm, 0.7 / orthogonal_norm


def flat(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in update.values()])
