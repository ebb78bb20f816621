"""Influence unlearning (IU; Koh & Liang, ICML 2017, as the "IU" baseline of SPARSE/SALUN ``unlearn/Wfisher.py``).

A one-shot edit from the influence-function approximation of retraining without the forget set. Reweighting the
training loss from 1/N on every sample to 1/n_r on the retain set and 0 on the forget set moves the optimum by
about H^-1 v with v = (1/N) sum_{D_f} grad l_i - (n_f / (N n_r)) sum_{D_r} grad l_j = (n_f / N)(g_f - g_r).
The code (docs/baselines.md section 7) does, in eval mode with mean-reduced CE:

    v = forget_sum / N - retain_sum * n_f / (N n_r)      (sums over batches of 256 of grad CE_mean * |batch|)
    k = woodfisher_code(v)                               (retain samples one at a time, N_wf = 1000)
    theta <- theta + alpha * k

[QUIRK, reproduced] ``woodfisher_code`` is not a Sherman-Morrison inverse-Fisher product: its vector ``o`` is
initialised to the first retain gradient g_1 and only ever rescaled, so k = v - c * g_1 for a scalar c. It
processes N_wf + 2 = 1002 retain samples (or all of them when fewer). The published baseline is thus one scaled
step along (g_f - g_r) plus a rank-1 correction along one retain gradient.
Library notes: with only a retain *subset* available (OrthoGrad's setting), n_r and N = n_f + n_r are the sizes
of the sets given, although the influence weights assume the full training set. For sequence tasks a sample is
an utterance and its loss the mean token CE. Cost: two gradient passes (forget, retain), up to 1002 per-sample
gradients, and a few flat vectors of the edited parameters' size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from orthograd.grads import per_sample_grads
from orthograd.methods.base import check_at_least, check_positive
from orthograd.methods.oneshot import OneShotConfig, OneShotMethod
from orthograd.methods.registry import register
from orthograd.tasks.base import Task


@dataclass
class InfluenceConfig(OneShotConfig):
    """IU settings; defaults are SPARSE/SALUN's (alpha 0.2 argparse default, tuned per run; N_wf 1000; batch 256)."""

    alpha: float = 0.2
    batch_size: int = 256
    woodfisher_n: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(alpha=self.alpha)
        check_at_least(minimum=1, batch_size=self.batch_size, woodfisher_n=self.woodfisher_n)


def summed_gradient(
    model: nn.Module, task: Task, batches: Iterable[Any], params: list[nn.Parameter]
) -> tuple[torch.Tensor, int]:
    """Flat sum over samples of the per-sample loss gradients, and the number of samples."""
    total = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    count = 0
    for batch in batches:
        losses = task.per_sample_loss(model, batch)
        grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
        total += _flatten(grads, params)
        count += losses.shape[0]
    if count == 0:
        raise ValueError("a gradient sum over an empty set: IU needs forget and retain samples")
    return total, count


def woodfisher_code(v: torch.Tensor, sample_grads: Iterable[torch.Tensor], *, n: int) -> torch.Tensor:
    """SPARSE's ``woodfisher`` loop applied to ``v``, exactly (its quirk included: ``o`` stays parallel to g_1)."""
    k = v.clone()
    o: torch.Tensor | None = None
    for idx, g in enumerate(sample_grads):
        if o is None:
            o = g.clone()
        else:
            t = torch.dot(o, g)
            k = k - (torch.dot(k, g) / (n + t)) * o
            o = o - (t / (n + t)) * o
        if idx > n:
            break
    return k


def _flatten(grads: Iterable[torch.Tensor | None], params: list[nn.Parameter]) -> torch.Tensor:
    filled = (g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params, strict=True))
    return torch.cat([g.reshape(-1) for g in filled])


@register
class InfluenceUnlearning(OneShotMethod[InfluenceConfig]):
    """One-shot: theta + alpha * WoodFisher-code(v), v = (n_f / N)(mean forget grad - mean retain grad)."""

    name: ClassVar[str] = "influence"

    def _per_sample_grads(self) -> Iterator[torch.Tensor]:
        """Flat gradients of the retain samples in order (the code's batch-size-1, unshuffled loader)."""
        ctx, names = self.context, list(self.params)
        params = list(self.params.values())
        loader = ctx.loader("retain", batch_size=self.config.batch_size, shuffle=False)
        for batch in ctx.batches(loader):
            grads = per_sample_grads(ctx.model, ctx.task.per_sample_loss, batch, params=names)
            # detached: a gradient over a parameter subset stays attached to the other parameters' graph
            rows = torch.cat([grads[n].detach().reshape(grads[n].shape[0], -1) for n in names], dim=1)
            del grads
            yield from rows.to(params[0].dtype)

    def run_epoch(self, epoch: int) -> Iterator[dict[str, float]]:
        cfg = self.config
        ctx = self.context
        params = list(self.params.values())
        ctx.model.eval()
        forget_sum, n_f = summed_gradient(
            ctx.model, ctx.task, ctx.batches(ctx.loader("forget", batch_size=cfg.batch_size, shuffle=False)), params
        )
        retain_sum, n_r = summed_gradient(
            ctx.model, ctx.task, ctx.batches(ctx.loader("retain", batch_size=cfg.batch_size, shuffle=False)), params
        )
        total = n_f + n_r
        v = forget_sum / total - retain_sum * (n_f / (total * n_r))
        k = woodfisher_code(v, self._per_sample_grads(), n=cfg.woodfisher_n)
        update = cfg.alpha * k
        with torch.no_grad():
            offset = 0
            for param in params:
                param.add_(update[offset : offset + param.numel()].view_as(param).to(param.dtype))
                offset += param.numel()
        yield {"v_norm": float(v.norm()), "change_norm": float(update.norm())}
