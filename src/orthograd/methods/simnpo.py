"""SimNPO: NPO without the reference model, on the length-normalised forget loss, plus a retain loss.

Fan et al., "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning" (arXiv:2410.07163;
repository OPTML-Group/Unlearn-Simple, TOFU ``simnpo_grad_diff``), as OpenUnlearning codes it
(``src/trainer/unlearn/simnpo.py``, ``configs/trainer/SimNPO.yaml``). On a forget batch, with ``l_i`` the mean
answer-token negative log-likelihood of sequence i (its NLL divided by its answer length):

    L_forget = -(2 / beta) * mean_i log sigmoid(beta * (l_i - delta))

and ``L = gamma * L_forget + alpha * R(retain batch)`` with R the task's NLL (or the KL to the original, as in
GradDiff). Where NPO compares the summed log-likelihood with the frozen original's, SimNPO uses no reference
model and normalises by length, so long answers do not dominate; ``delta`` is a margin on the per-token loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from orthograd.methods.base import check_positive
from orthograd.methods.graddiff import ForgetRetainConfig, ForgetRetainMethod
from orthograd.methods.registry import register


@dataclass
class SimNPOConfig(ForgetRetainConfig):
    """SimNPO hyperparameters; defaults are OpenUnlearning's ``SimNPO.yaml``.

    beta 4.5, delta 0 (the original repository calls it ``gamma``), gamma 0.125 (the original's ``npo_coeff``:
    the forget term's weight), alpha 1 with the NLL retain loss; optimizer and batches as GradDiff. The original
    repository's TOFU config uses beta 2.5 and npo_coeff 0.1375.
    """

    beta: float = 4.5
    delta: float = 0.0
    gamma: float = 0.125

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(beta=self.beta)


def simnpo_loss(mean_nll: torch.Tensor, *, beta: float, delta: float) -> torch.Tensor:
    """``-(2/beta) mean log sigmoid(beta (l - delta))`` from per-sequence mean token NLLs ``l``."""
    return -(2.0 / beta) * F.logsigmoid(beta * (mean_nll - delta)).mean()


@register
class SimNPO(ForgetRetainMethod[SimNPOConfig]):
    """SimNPO's length-normalised, reference-free forget loss plus the retain loss."""

    name: ClassVar[str] = "simnpo"

    def forget_term(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        mean_nll = self.context.task.per_sample_loss(self.context.model, batch)
        loss = simnpo_loss(mean_nll, beta=self.config.beta, delta=self.config.delta)
        return loss, {"forget_loss": float(mean_nll.detach().mean())}
