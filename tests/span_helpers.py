"""One small OrthoGrad step for the retain-span tests: a float64 CNN, a forget gradient and a retain batch.

``tests/test_span.py`` builds the materialised and the ghost span of it; ``tests/test_distributed.py`` the
data-parallel spans, its retain rows split over two ranks (and over three: ``three_rank_direction``, here so that a
spawned rank imports only this light module). All must give the same direction.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orthograd.distributed.ghost import data_parallel_ghost_span
from orthograd.grads import per_sample_grads_and_losses
from orthograd.grads.ghost import ghost_span
from orthograd.methods.orthograd.direction import orthograd_direction
from orthograd.methods.orthograd.span import MaterialisedSpan
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
    forget_grad = dict(zip(params, torch.autograd.grad(forget_loss, list(params.values())), strict=True))
    retain_x = x[FORGET:].clone()
    if nan_retain_sample:
        retain_x[-1, 0, 0, 0] = float("nan")
    return model, forget_grad, (retain_x, y[FORGET:])


# the adaptive schedule's mix at alpha = 0.3 (each term at unit norm), so the norms matter too
ADAPTIVE_MIX = {"alpha": 0.3, "normalized": True}


def single_process_reference() -> tuple[MaterialisedSpan, torch.Tensor]:
    """The reference: the span of the whole span problem's materialised per-sample gradients and its direction,
    flattened."""
    model, forget_grad, batch = problem()
    per_sample, losses = per_sample_grads_and_losses(model, loss_fn, batch, engine="loop")
    span = MaterialisedSpan(per_sample, forget_grad, retain_loss=float(losses.mean()))
    direction = orthograd_direction(forget_grad=forget_grad, span=span, **ADAPTIVE_MIX)
    assert direction is not None
    return span, flat(direction.update)


def flat(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in update.values()])


def three_rank_direction(rank: int, port: int, out_dir: str) -> None:
    """A spawned rank of 3: the ghost span's Gram and direction with the retain rows split 1 + 2 + 3, saved."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
                            timeout=timedelta(seconds=60))
    try:
        model, forget_grad, (x, y) = problem()
        start = [0, 1, 3, RETAIN]
        shard = (x[start[rank] : start[rank + 1]], y[start[rank] : start[rank + 1]])
        span = data_parallel_ghost_span(ghost_span(model, loss_fn, shard, probe=forget_grad))
        direction = orthograd_direction(forget_grad=forget_grad, span=span, **ADAPTIVE_MIX)
        assert direction is not None
        torch.save({"gram": span.gram, "update": flat(direction.update)}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()
