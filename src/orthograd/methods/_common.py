"""Pieces shared by the iterative baselines (FT, NegGrad, NegGrad+, SCRUB, GDR-GMA).

- ``ScheduleConfig``: a per-epoch step-decay learning rate (SPARSE's MultiStepLR, SCRUB's adjust_learning_rate)
  and optional gradient-norm clipping (a documented deviation, off by default);
- ``OneSetDescent``: the SPARSE/SALUN training wrapper of FT and NegGrad (one pass over one set per epoch, the task
  loss with a sign, one optimizer step per batch);
- ``descend``: one optimizer step on a loss; ``distill_kl``: SCRUB's temperature-scaled KL on logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

import torch
import torch.nn.functional as F

from orthograd.methods.base import IterativeConfig, MethodContext, UnlearningMethod, make_optimizer
from orthograd.tasks.base import IGNORE_INDEX


@dataclass
class ScheduleConfig(IterativeConfig):
    """Step decay: at (1-based) epoch e the learning rate is ``lr * lr_decay_rate ** #{m in lr_decay_epochs: m < e}``.

    That is MultiStepLR stepped once per epoch (SPARSE/SALUN) and SCRUB's ``adjust_learning_rate``, which agree.
    ``max_grad_norm``: clip the gradient norm of the trainable parameters before each step; no reference code
    clips, so any value other than None is a [DEVIATION] (useful for gradient ascent on seq2seq losses).
    """

    lr_decay_epochs: tuple[int, ...] = ()
    lr_decay_rate: float = 0.1
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lr_decay_epochs = tuple(int(m) for m in self.lr_decay_epochs)
        if any(m < 1 for m in self.lr_decay_epochs):
            raise ValueError(f"lr_decay_epochs must be epoch numbers >= 1, got {list(self.lr_decay_epochs)}")
        if not 0.0 < self.lr_decay_rate <= 1.0:
            raise ValueError(f"lr_decay_rate must be in (0, 1], got {self.lr_decay_rate}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm}")


def decayed_lr(config: ScheduleConfig, epoch: int) -> float:
    """The learning rate of 1-based ``epoch`` under the config's step decay."""
    passed = sum(1 for m in config.lr_decay_epochs if m < epoch)
    return config.lr * config.lr_decay_rate**passed


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, *, max_grad_norm: float | None = None) -> None:
    """zero_grad, backward, optional norm clipping over the optimizer's parameters, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened outputs, times T^2 (SCRUB's ``DistillKL``).

    ``[B, C]`` logits: the sum over classes averaged over the batch ("batchmean"). ``[B, T, V]`` logits: averaged
    over the labelled tokens (``targets != IGNORE_INDEX``), the per-token version of docs/baselines.md section 8.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    per_position = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)
    if per_position.dim() == 1:
        return temperature**2 * per_position.mean()
    mask = (targets != IGNORE_INDEX).to(per_position.dtype)
    return temperature**2 * (per_position * mask).sum() / mask.sum().clamp_min(1.0)


ScheduleConfigT = TypeVar("ScheduleConfigT", bound=ScheduleConfig)


class OneSetDescent(UnlearningMethod[ScheduleConfigT]):
    """One pass over one set per epoch, a step on ``sign * task loss`` per batch (SPARSE/SALUN ``impl.py``).

    Subclasses say which set (``data``) and the sign (+1 descent, -1 ascent); train mode as in the source.
    """

    data: ClassVar[Literal["forget", "retain"]]
    sign: ClassVar[float]
    train_mode: ClassVar[bool] = True

    def __init__(self, config: ScheduleConfigT, context: MethodContext) -> None:
        super().__init__(config, context)
        self.optimizer = make_optimizer(config, list(context.trainable_parameters().values()))

    def run_epoch(self, epoch: int) -> Iterator[dict[str, float]]:
        cfg = self.config
        set_lr(self.optimizer, decayed_lr(cfg, epoch))
        batch_size = cfg.retain_batch_size if self.data == "retain" else cfg.forget_batch_size
        loader = self.context.loader(self.data, batch_size=batch_size)
        for batch in self.context.batches(loader):
            loss = self.context.task.mean_loss(self.context.model, batch)
            descend(self.optimizer, self.sign * loss, max_grad_norm=cfg.max_grad_norm)
            yield {f"{self.data}_loss": float(loss.detach())}
