"""The relearning test: does a little fine-tuning on part of the forget set bring the rest of it back?

Unlearned LMs often hide knowledge rather than remove it: a few steps on some forgotten facts restore others
(Lynch et al. 2024, "Eight methods to evaluate robust unlearning in LLMs"; Hu et al. 2024, "Jogging the memory of
unlearned LLMs"). A copy of the model is fine-tuned for ``steps`` AdamW steps on ``train`` (some facts of the
forget authors) and the answer probability of ``evaluate`` (their other facts) is read before and after; the model
retrained without the forget set, doing the same, is the reference: it can only learn ``evaluate`` from ``train``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from orthograd.tasks.batches import as_dataset
from orthograd.tasks.causal_lm import CausalLMTask
from orthograd.training import train_model


def answer_probability(model: nn.Module, items: Sequence[Mapping[str, torch.Tensor]], *, task: CausalLMTask,
                       device: torch.device) -> float:
    """Mean length-normalised answer probability of ``items`` (TOFU's "Prob.")."""
    loader = DataLoader(as_dataset(list(items)), batch_size=64, collate_fn=task.collate_fn())
    return float(task.sequence_losses(model, loader, device=device).neg().exp().mean())


def relearn(
    model: nn.Module,
    *,
    train: Sequence[Mapping[str, torch.Tensor]],
    evaluate: Sequence[Mapping[str, torch.Tensor]],
    task: CausalLMTask,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> dict[str, float]:
    """``{"before", "after"}``: the answer probability of ``evaluate`` before and after ``steps`` AdamW steps of a
    copy of ``model`` on ``train`` (``orthograd.training.train_model``); ``model`` itself is not changed."""
    if steps < 1 or not train or not evaluate:
        raise ValueError("relearning needs steps >= 1 and non-empty train and evaluate sets")
    before = answer_probability(model, evaluate, task=task, device=device)
    student = copy.deepcopy(model).requires_grad_(True)  # an unlearned model may come back with frozen weights
    student = train_model(student, as_dataset(list(train)), task=task, steps=steps, lr=lr, batch_size=batch_size,
                          optimizer="adamw", seed=seed, device=device)
    return {"before": before, "after": answer_probability(student, evaluate, task=task, device=device)}
