"""NPO: Negative Preference Optimization, the forget loss of DPO with only a rejected answer.

Zhang, Lin, Bai and Mei, "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
COLM 2024 (arXiv:2404.05868). On a forget batch, with the model before unlearning as the frozen reference:

    L_NPO = -(2 / beta) * mean_i log sigmoid(-beta * log(p_theta(y_i | x_i) / p_ref(y_i | x_i)))

where log p(y | x) is the log-likelihood of the whole target (summed over its answer tokens for a language model,
``Task.per_sample_nll``). As beta -> 0 it tends to gradient ascent (NegGrad); unlike it, the loss is bounded below
and its gradient fades once a forget answer is much less likely than under the reference. The paper's "+RT"
variant (NPO-RT, the default here) adds the retain loss: ``L = L_NPO + retain_weight * CE(retain batch)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from orthograd.methods._common import ForgetAnchored, TofuOptimizerConfig
from orthograd.methods.base import MethodContext, check_at_least, check_positive
from orthograd.methods.registry import register


@dataclass
class NPOConfig(TofuOptimizerConfig):
    """NPO hyperparameters; defaults are the paper's TOFU runs (its repository's ``forget.py``).

    beta 0.1; retain_weight 1 (NPO-RT; 0 gives NPO alone); AdamW(lr 1e-5, weight decay 0.01), batch 32 on each
    set (``TofuOptimizerConfig``). An epoch is one pass over the forget set, each forget batch paired with the next
    batch of a reshuffled cycle of the retain set; the model trains in train mode (dropout on), as under the
    source's HF Trainer.

    [DEVIATION] The source's retain loss is the token mean over the whole batch (HF's ``outputs.loss``); here it
    is the task's mean loss (per-sequence token means, averaged), as every method of the library uses. The
    source's learning rate is for full fine-tuning of a 7B model; the runner's fairness policy trains the same
    LoRA adapters as OrthoGrad (unless ``lora=None``), which usually wants a larger ``lr``.
    """

    beta: float = 0.1
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(note="beta -> 0 is gradient ascent: use neggrad", beta=self.beta)
        check_at_least(minimum=0, note="0: NPO without its retain term", retain_weight=self.retain_weight)


def npo_loss(nll: torch.Tensor, reference_nll: torch.Tensor, *, beta: float) -> torch.Tensor:
    """``-(2/beta) mean log sigmoid(-beta log(p / p_ref))`` from per-sample negative log-likelihoods."""
    log_ratio = reference_nll - nll  # log p_theta(y|x) - log p_ref(y|x)
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


@register
class NPO(ForgetAnchored[NPOConfig]):
    """NPO on forget batches plus ``retain_weight`` times the retain loss (NPO-RT), one optimizer step per pair."""

    name: ClassVar[str] = "npo"

    def __init__(self, config: NPOConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        self.reference = context.teacher()

    def uses_retain(self) -> bool:
        return self.config.retain_weight > 0

    def forget_loss(self, forget_batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """NPO's loss on a forget batch, and the batch's mean log-likelihood ratio to the reference."""
        cfg = self.config
        task = self.context.task
        nll = task.per_sample_nll(self.context.model, forget_batch)
        with torch.no_grad():
            reference_nll = task.per_sample_nll(self.reference, forget_batch)
        loss = npo_loss(nll, reference_nll, beta=cfg.beta)
        return loss, {
            "forget_nll": float(nll.detach().mean()),
            "log_ratio": float((reference_nll - nll).detach().mean()),
        }

    def objective(self, forget_batch: Any, retain_batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """NPO's loss plus, for NPO-RT, ``retain_weight`` times the task loss on the retain batch."""
        loss, stats = self.forget_loss(forget_batch)
        stats["npo_loss"] = float(loss.detach())
        if self.uses_retain():
            retain_loss = self.context.task.mean_loss(self.context.model, retain_batch)
            loss = loss + self.config.retain_weight * retain_loss
            stats["retain_loss"] = float(retain_loss.detach())
        return loss, stats
