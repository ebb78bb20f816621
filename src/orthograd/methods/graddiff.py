"""GradDiff: ``gamma`` times gradient ascent on the forget set plus ``alpha`` times a retain loss.

As OpenUnlearning codes it (``src/trainer/unlearn/grad_diff.py``, ``configs/trainer/GradDiff.yaml``), the
language-model baseline TOFU, MUSE and WMDP users compare against:

    L = gamma * (-NLL(forget batch)) + alpha * R(retain batch),   R = NLL, or KL(original || model) per token

with gamma = alpha = 1. Each forget batch is paired with the next batch of a reshuffled cycle of the retain set
(OpenUnlearning's ``anchor: forget``), one optimizer step per pair. It differs from NegGrad+ (``neggrad+``,
Kurmanji et al.) by its weights (1 and 1, not a convex 0.05/0.95 split), its optimizer (AdamW, not SGD), its epoch
(a pass over the forget set, not the retain set), the KL option and no proximal term.

``ForgetRetainMethod`` is the shared objective of the OpenUnlearning family (GradDiff, SimNPO, RMU) on the
forget-anchored loop it shares with NPO (``_common.ForgetAnchored``): a subclass only says what its forget term
is, and may add retain terms.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
import torch.nn.functional as F

from orthograd.methods._common import ForgetAnchored, TofuOptimizerConfig
from orthograd.methods.base import MethodContext, check_at_least, check_positive
from orthograd.methods.registry import register
from orthograd.tasks.base import IGNORE_INDEX, Task

RetainLoss = Literal["nll", "kl"]


@dataclass
class ForgetRetainConfig(TofuOptimizerConfig):
    """Hyperparameters shared by GradDiff, SimNPO and RMU; defaults are OpenUnlearning's TOFU runs.

    gamma: weight of the forget term; alpha: weight of the retain term; retain_loss: "nll" (the task's loss on
    the retain batch) or "kl" (KL from the frozen original's next-token distribution to the model's, per token).
    AdamW(lr 1e-5, weight decay 0.01), batch 32 on each set (``TofuOptimizerConfig``).

    [DEVIATION] OpenUnlearning's NLL terms are the token mean over the whole batch (HF's ``outputs.loss``); here
    they are the task's mean loss (per-sequence token means, averaged), as every method of the library uses; its
    KL averages over every position including padding, here over the non-padding positions. Its learning rate is
    for full fine-tuning of 1-8 B models; the runner's fairness policy trains the same LoRA adapters as OrthoGrad
    (unless ``lora=None``), which usually wants a larger ``lr``.
    """

    gamma: float = 1.0
    alpha: float = 1.0
    retain_loss: RetainLoss = "nll"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(note="the forget term's weight", gamma=self.gamma)
        check_at_least(minimum=0, note="the retain term's weight; 0: no retain term", alpha=self.alpha)


def retain_kl(task: Task, model: torch.nn.Module, original: torch.nn.Module, batch: Any) -> torch.Tensor:
    """KL(original || model) of the output distributions: per sample for ``[B, C]`` logits; per position,
    averaged over the non-padding positions (``attention_mask``, else the labelled ones), for ``[B, T, V]``."""
    log_model = F.log_softmax(task.logits(model, batch), dim=-1)
    with torch.no_grad():
        log_original = F.log_softmax(task.logits(original, batch), dim=-1)
    per_position = (log_original.exp() * (log_original - log_model)).sum(dim=-1)
    if per_position.dim() == 1:
        return per_position.mean()
    mask = _positions(batch, task, like=per_position)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def _positions(batch: Any, task: Task, *, like: torch.Tensor) -> torch.Tensor:
    """1.0 at the ``[B, T']`` positions a per-position loss counts: the attended inputs, else the labelled ones."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        mask: torch.Tensor = batch["attention_mask"]
        return mask[:, : like.shape[1]].to(like.dtype)
    return (task.targets(batch) != IGNORE_INDEX).to(like.dtype)


ForgetRetainConfigT = TypeVar("ForgetRetainConfigT", bound=ForgetRetainConfig)


class ForgetRetainMethod(ForgetAnchored[ForgetRetainConfigT]):
    """``gamma * forget_term(forget batch) + alpha * retain_term(retain batch)``, one step per forget batch, in
    train mode (OpenUnlearning trains under HF's Trainer, dropout on)."""

    def __init__(self, config: ForgetRetainConfigT, context: MethodContext) -> None:
        super().__init__(config, context)
        self.original = context.teacher() if self.needs_original() else None

    def needs_original(self) -> bool:
        """Whether the loss reads the frozen original model (taken before the first update)."""
        return self.config.retain_loss == "kl"

    @abc.abstractmethod
    def forget_term(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The forget term on a forget batch (to be minimised), and statistics; each method defines its own."""

    def retain_term(self, batch: Any) -> torch.Tensor:
        """The retain term on a retain batch: the task loss or the KL to the original."""
        task, model = self.context.task, self.context.model
        if self.config.retain_loss == "kl":
            assert self.original is not None
            return retain_kl(task, model, self.original, batch)
        return task.mean_loss(model, batch)

    def objective(self, forget_batch: Any, retain_batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one step and its parts."""
        cfg = self.config
        forget, stats = self.forget_term(forget_batch)
        loss = cfg.gamma * forget
        stats["forget_term"] = float(forget.detach())
        if cfg.alpha > 0:
            retain = self.retain_term(retain_batch)
            loss = loss + cfg.alpha * retain
            stats["retain_term"] = float(retain.detach())
        return loss, stats


@register
class GradDiff(ForgetRetainMethod[ForgetRetainConfig]):
    """Ascent on the forget loss plus descent on the retain loss (OpenUnlearning's GradDiff)."""

    name: ClassVar[str] = "graddiff"

    def forget_term(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        forget_loss = self.context.task.mean_loss(self.context.model, batch)
        return -forget_loss, {"forget_loss": float(forget_loss.detach())}
