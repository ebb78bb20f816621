"""NegGrad+: descent on the retain loss and ascent on the forget loss, weighted by beta.

Kurmanji et al., "Towards Unbounded Machine Unlearning", NeurIPS 2023, as coded in the SCRUB repository
(``small_scale_unlearning.ipynb``, ``run_neggrad_epoch``; docs/baselines.md section 5):

    L = beta * [CE(retain batch) + (prox_wd / 2) * sum_p ||p - p0||^2] - (1 - beta) * CE(forget batch)

An epoch is one pass over the retain set, each retain batch paired with the next batch of a cycled forget loader
(``itertools.cycle`` semantics: the forget loader is shuffled once per epoch and, when it runs out within the epoch,
the same batches repeat in the same order).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from orthograd.methods._common import descend
from orthograd.methods.base import IterativeConfig, IterativeMethod, MethodContext, OptimizerName, check_at_least
from orthograd.methods.registry import register

CLASSIFICATION_PROX_WD = 0.1  # the notebook's run (main.py --weight_decay 0.1); main.py's own default is 5e-4


@dataclass
class NegGradPlusConfig(IterativeConfig):
    """NegGrad+ hyperparameters; defaults are the SCRUB small-scale notebook's.

    beta (``ng_alpha``): 0.95, weight of the retain term. SGD(lr 0.01, no momentum, no weight decay), retain batch
    128, forget batch 64; the source runs 10 epochs.
    prox_wd: weight of the proximal L2-to-initial-parameters term (the notebook's ``args.weight_decay``). None (the
    default) resolves to the notebook's 0.1 for classification and to 0 for other tasks (ASR), as the spec
    recommends; pass a number to force it.

    [QUIRK] The source runs the model in eval mode during training (BatchNorm uses running statistics, dropout is
    off); kept, and not optional because the runner owns the train/eval mode.
    [DEVIATION] The source trains all parameters for a fixed number of epochs; here the runner's fairness policy
    applies (the same LoRA adapters as OrthoGrad unless ``lora=None``, so the proximal term is on the adapters;
    the same stopping rule and ``max_epochs`` for every method).
    """

    beta: float = 0.95
    prox_wd: float | None = None
    lr: float = 0.01
    forget_batch_size: int = 64
    retain_batch_size: int = 128
    optimizer: OptimizerName = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1) (beta=1 ignores the forget set: use finetune), got {self.beta}")
        check_at_least(minimum=0, optional=True, note="None: the task's default", prox_wd=self.prox_wd)


@register
class NegGradPlus(IterativeMethod[NegGradPlusConfig]):
    """beta * (retain CE + proximal term) - (1 - beta) * forget CE, one SGD step per retain batch."""

    name: ClassVar[str] = "neggrad+"
    train_mode: ClassVar[bool] = False  # [QUIRK] the source's model.eval()

    def __init__(self, config: NegGradPlusConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        self.initial = {name: p.detach().clone() for name, p in self.params.items()}
        if config.prox_wd is not None:
            self.prox_wd = config.prox_wd
        else:
            self.prox_wd = CLASSIFICATION_PROX_WD if context.task.name == "classification" else 0.0

    def objective(self, retain_batch: Any, forget_batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to descend and its parts."""
        cfg = self.config
        task, model = self.context.task, self.context.model
        retain_loss = task.mean_loss(model, retain_batch)
        forget_loss = task.mean_loss(model, forget_batch)
        loss = cfg.beta * retain_loss - (1.0 - cfg.beta) * forget_loss
        if self.prox_wd > 0:
            distance = sum(((p - self.initial[n]) ** 2).sum() for n, p in self.params.items())
            loss = loss + cfg.beta * (self.prox_wd / 2.0) * distance
        stats = {"retain_loss": float(retain_loss.detach()), "forget_loss": float(forget_loss.detach())}
        return loss, stats

    def run_epoch(self, epoch: int) -> Iterator[dict[str, float]]:
        cfg = self.config
        retain_loader = self.context.loader("retain", batch_size=cfg.retain_batch_size)
        forget_loader = self.context.loader("forget", batch_size=cfg.forget_batch_size)
        forget_batches = itertools.cycle(self.context.batches(forget_loader))
        # the forget batches cycle; the retain loader sets the epoch
        for retain_batch, forget_batch in zip(self.context.batches(retain_loader), forget_batches, strict=False):
            loss, stats = self.objective(retain_batch, forget_batch)
            descend(self.optimizer, loss)
            yield {"loss": float(loss.detach()), **stats}
