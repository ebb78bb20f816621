"""NegGrad (gradient ascent, "GA"): maximise the loss on the forget set.

As in the SPARSE/SALUN code (Jia et al., NeurIPS 2023; ``unlearn/GA.py`` + ``unlearn/impl.py``; docs/baselines.md
section 4). Thudi et al. and Golatkar et al. use the same baseline under the names GA / NegGrad.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from orthograd.methods._common import OneSetDescent, SparseConfig
from orthograd.methods.registry import register


@dataclass
class NegGradConfig(SparseConfig):
    """NegGrad hyperparameters; defaults are SPARSE/SALUN's (lr from their README's GA command).

    SGD(lr 1e-4, momentum 0.9, weight decay 5e-4), forget batch 256, MultiStepLR milestones (91, 136), rate 0.1,
    stepped per epoch. An epoch is one pass over the forget set with loss ``-CE``, in train mode. The source runs
    5 epochs. ``retain_batch_size`` is unused (NegGrad never sees the retain set).

    [DEVIATION] ``max_grad_norm`` clips the gradient norm before each step; the source has no clipping, so the
    default is None. The ascent loss is unbounded below and seq2seq cross-entropy diverges fast: clipping (and the
    runner's stopping rule on forget WER) are the documented ways to tame it for ASR. Otherwise the runner's
    fairness policy applies (the same LoRA as OrthoGrad unless ``lora=None``, the same stopping rule and
    ``max_epochs`` for every method; no augmentation).
    """

    lr: float = 1e-4
    forget_batch_size: int = 256


@register
class NegGrad(OneSetDescent[NegGradConfig]):
    """Gradient ascent on the forget loss."""

    name: ClassVar[str] = "neggrad"
    data: ClassVar[Literal["forget", "retain"]] = "forget"
    sign: ClassVar[float] = -1.0
