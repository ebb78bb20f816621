"""Pieces shared by the iterative baselines (FT, NegGrad, NegGrad+, SCRUB, GradDiff, NPO, SimNPO, RMU).

- ``ScheduleConfig``: a per-epoch step-decay learning rate (SPARSE's MultiStepLR, SCRUB's adjust_learning_rate)
  and optional gradient-norm clipping (a documented deviation, off by default); ``SparseConfig``: its
  SPARSE/SALUN defaults, shared by FT and NegGrad;
- ``OneSetDescent``: the SPARSE/SALUN training wrapper of FT and NegGrad (one pass over one set per epoch, the task
  loss with a sign, one optimizer step per batch);
- ``AdamWConfig``: AdamW at weight decay 0.01 (GDR-GMA, the TOFU recipe); ``TofuOptimizerConfig``: the TOFU
  setting of the language-model baselines (NPO's repository, OpenUnlearning); ``ForgetAnchored``: their loop
  (a step per forget batch, paired with the next batch of a retain cycle);
- ``descend``: one optimizer step on a loss; ``distill_kl``: SCRUB's temperature-scaled KL on logits.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
import torch.nn.functional as F

from orthograd.methods.base import IterativeConfig, IterativeConfigT, IterativeMethod, MethodContext, OptimizerName
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


@dataclass
class SparseConfig(ScheduleConfig):
    """The optimizer and schedule SPARSE/SALUN's FT and GA share: SGD(momentum 0.9, weight decay 5e-4) and
    MultiStepLR milestones (91, 136) at rate 0.1 (no effect within their 5-10 epochs); each sets its own lr and
    batch size."""

    optimizer: OptimizerName = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_epochs: tuple[int, ...] = (91, 136)


@dataclass
class AdamWConfig(IterativeConfig):
    """AdamW at torch's default weight decay, 0.01: the optimizer of GDR-GMA's code and of the TOFU recipe."""

    optimizer: OptimizerName = "adamw"
    weight_decay: float = 0.01


@dataclass
class TofuOptimizerConfig(AdamWConfig):
    """The TOFU fine-tuning setting that NPO's repository and OpenUnlearning both use: AdamW(lr 1e-5, weight decay
    0.01), batch 32 on each set (OpenUnlearning: 8 per device x 4 accumulation steps)."""

    lr: float = 1e-5
    forget_batch_size: int = 32
    retain_batch_size: int = 32


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


class OneSetDescent(IterativeMethod[ScheduleConfigT]):
    """One pass over one set per epoch, a step on ``sign * task loss`` per batch (SPARSE/SALUN ``impl.py``).

    Subclasses say which set (``data``) and the sign (+1 descent, -1 ascent); train mode as in the source.
    """

    data: ClassVar[Literal["forget", "retain"]]
    sign: ClassVar[float]

    def run_epoch(self, epoch: int) -> Iterator[dict[str, float]]:
        cfg = self.config
        set_lr(self.optimizer, decayed_lr(cfg, epoch))
        batch_size = cfg.retain_batch_size if self.data == "retain" else cfg.forget_batch_size
        loader = self.context.loader(self.data, batch_size=batch_size)
        for batch in self.context.batches(loader):
            loss = self.context.task.mean_loss(self.context.model, batch)
            descend(self.optimizer, self.sign * loss, max_grad_norm=cfg.max_grad_norm)
            yield {f"{self.data}_loss": float(loss.detach())}


class ForgetAnchored(IterativeMethod[IterativeConfigT]):
    """An epoch is a pass over the forget set; each forget batch is paired with the next batch of a reshuffled
    cycle of the retain set (OpenUnlearning's ``anchor: forget``, NPO's ``forget.py``), one step per pair.

    Subclasses define ``objective``; one whose loss may leave the retain set out says so in ``uses_retain`` (the
    retain cycle is then not read, and ``objective`` gets None).
    """

    def __init__(self, config: IterativeConfigT, context: MethodContext) -> None:
        super().__init__(config, context)
        self._retain = context.endless(context.loader("retain", batch_size=config.retain_batch_size))

    def uses_retain(self) -> bool:
        """Whether a step reads a retain batch (True by default)."""
        return True

    @abc.abstractmethod
    def objective(self, forget_batch: Any, retain_batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one step and its parts (``retain_batch`` is None when ``uses_retain`` is False)."""

    def run_epoch(self, epoch: int) -> Iterator[dict[str, float]]:
        forget_loader = self.context.loader("forget", batch_size=self.config.forget_batch_size)
        for forget_batch in self.context.batches(forget_loader):
            loss, stats = self.objective(forget_batch, next(self._retain) if self.uses_retain() else None)
            descend(self.optimizer, loss)
            yield {"loss": float(loss.detach()), **stats}
