"""Finetune (FT): fine-tune on the retain set only, the "catastrophic forgetting" baseline.

As in the SPARSE/SALUN code that the unlearning literature uses for FT (Jia et al., "Model Sparsity Can Simplify
Machine Unlearning", NeurIPS 2023; ``unlearn/FT.py`` + ``unlearn/impl.py``; docs/baselines.md section 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from orthograd.methods._common import OneSetDescent, SparseConfig
from orthograd.methods.registry import register


@dataclass
class FinetuneConfig(SparseConfig):
    """FT hyperparameters; defaults are SPARSE/SALUN's code defaults.

    SGD(lr 0.01, momentum 0.9, weight decay 5e-4), retain batch 256, MultiStepLR milestones (91, 136) with rate
    0.1 stepped per epoch (no effect within the source's 10 epochs). An epoch is one pass over the retain set, in
    train mode. ``forget_batch_size`` is unused (FT never sees the forget set).

    [DEVIATION] The source trains all parameters for a fixed 10 epochs on train-augmented data; here the runner's
    fairness policy applies (the same LoRA adapters as OrthoGrad unless ``lora=None``; the same stopping rule and
    ``max_epochs`` for every method; no augmentation). ``max_grad_norm`` (default None) is not in the source.
    """

    lr: float = 0.01
    retain_batch_size: int = 256


@register
class Finetune(OneSetDescent[FinetuneConfig]):
    """Gradient descent on the retain loss only."""

    name: ClassVar[str] = "finetune"
    data: ClassVar[Literal["forget", "retain"]] = "retain"
    sign: ClassVar[float] = 1.0
