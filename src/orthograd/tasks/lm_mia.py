"""Membership attacks on causal LMs as the field reports them (OpenUnlearning's TOFU/MUSE evaluation, MUSE's PrivLeak).

Each attack gives every sequence a score that is *higher when it looks unseen*, computed on its answer tokens:

- ``loss``: the mean answer-token cross-entropy (Yeom et al.);
- ``zlib``: that loss divided by the zlib-compressed byte length of the answer text (Carlini et al. 2021);
- ``min_k``: minus the mean of the lowest ``k`` fraction of the answer tokens' log-probabilities (Shi et al. 2024);
- ``min_k_plus_plus``: the same on each token's log-probability standardised by the model's own distribution at
  that position, ``(log p(x_t) - mu_t) / sigma_t`` with ``mu_t = E_v[log p(v)]`` and ``sigma_t^2`` its variance
  (Zhang et al. 2024).

Min-K% and Min-K%++ read the answer tokens without the final end token, as OpenUnlearning does. ``signed_auc`` is
OpenUnlearning's AUC: members (the forget set) labelled 0, non-members (never-trained holdout) 1, scored by the
attack score, so 1 means the forget set looks trained on, 0.5 unseen, and below 0.5 *more* unseen than data never
seen (over-forgetting, which a classifier fitted on either side would misread as remembering). ``privleak`` is
MUSE's relative gap to the retrained model's AUC, in percent.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from orthograd.tasks import batches
from orthograd.tasks.base import IGNORE_INDEX
from orthograd.tasks.causal_lm import CausalLMTask

ATTACKS: tuple[str, ...] = ("loss", "zlib", "min_k", "min_k_plus_plus")
DEFAULT_K = 0.4  # OpenUnlearning's TOFU and MUSE configs for Min-K% and Min-K%++
EVAL_BATCH_SIZE = 32
_VARIANCE_FLOOR = 1e-6  # OpenUnlearning's clamp of sigma^2


@dataclass(frozen=True)
class TokenStats:
    """One sequence's answer tokens: their log-probabilities, the mean and variance of ``log p`` over the
    vocabulary at each position (end token excluded), and the mean loss over every labelled token."""

    log_probs: np.ndarray
    mu: np.ndarray
    variance: np.ndarray
    loss: float


@torch.no_grad()
def token_stats(
    model: nn.Module, items: Sequence[Mapping[str, torch.Tensor]], *, pad_token_id: int, device: torch.device
) -> list[TokenStats]:
    """``TokenStats`` of each ``{"input_ids", "labels"}`` item (labels -100 on the prompt)."""
    task = CausalLMTask(pad_token_id=pad_token_id)
    loader = DataLoader(batches.as_dataset(list(items)), batch_size=EVAL_BATCH_SIZE, collate_fn=task.collate_fn())
    was_training = model.training
    model.eval()
    out: list[TokenStats] = []
    try:
        for batch in loader:
            batch = task.to_device(batch, device)
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            log_p = torch.log_softmax(batches.output_logits(model(**inputs))[:, :-1].double(), dim=-1)
            targets = batch["labels"][:, 1:]
            mu = (log_p.exp() * log_p).sum(-1)
            variance = (log_p.exp() * log_p.square()).sum(-1) - mu.square()
            chosen = log_p.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            for row in range(targets.shape[0]):
                where = (targets[row] != IGNORE_INDEX).nonzero().squeeze(-1)
                if where.numel() == 0:
                    raise ValueError("every sequence needs a labelled (answer) token")
                answer = where[:-1] if where.numel() > 1 else where  # the end token is left out, as OpenUnlearning
                out.append(TokenStats(log_probs=chosen[row, answer].cpu().numpy(), mu=mu[row, answer].cpu().numpy(),
                                      variance=variance[row, answer].cpu().numpy(),
                                      loss=float(-chosen[row, where].mean())))
    finally:
        model.train(was_training)
    return out


def _lowest_mean(values: np.ndarray, k: float) -> float:
    count = max(1, int(len(values) * k))
    return float(np.sort(values)[:count].mean())


def min_k_score(stats: TokenStats, *, k: float = DEFAULT_K) -> float:
    """Min-K%: minus the mean of the ``k`` lowest fraction of the answer-token log-probabilities."""
    return -_lowest_mean(stats.log_probs, k)


def min_k_plus_plus_score(stats: TokenStats, *, k: float = DEFAULT_K) -> float:
    """Min-K%++: Min-K% over ``(log p(x_t) - mu_t) / sigma_t``."""
    standardised = (stats.log_probs - stats.mu) / np.sqrt(np.maximum(stats.variance, _VARIANCE_FLOOR))
    return -_lowest_mean(standardised, k)


def zlib_score(stats: TokenStats, text: str) -> float:
    """zlib: the mean answer loss over the compressed length (bytes) of the answer text."""
    return stats.loss / len(zlib.compress(text.encode("utf-8")))


def attack_scores(stats: Sequence[TokenStats], texts: Sequence[str], *, k: float = DEFAULT_K) -> dict[str, np.ndarray]:
    """Every attack's score of each sequence (higher: looks unseen); ``texts`` are the answers (for zlib)."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be a fraction in (0, 1], got {k}")
    return {
        "loss": np.array([s.loss for s in stats]),
        "zlib": np.array([zlib_score(s, t) for s, t in zip(stats, texts, strict=True)]),
        "min_k": np.array([min_k_score(s, k=k) for s in stats]),
        "min_k_plus_plus": np.array([min_k_plus_plus_score(s, k=k) for s in stats]),
    }


def signed_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """OpenUnlearning's MIA AUC: 1 when members (forget) score lower than non-members (look trained on), 0.5
    indistinguishable, 0 when members look *less* seen than non-members (over-forgetting)."""
    from sklearn.metrics import roc_auc_score

    members, others = np.asarray(member_scores, dtype=np.float64), np.asarray(nonmember_scores, dtype=np.float64)
    if members.size == 0 or others.size == 0:
        raise ValueError("the AUC needs at least one member and one non-member score")
    labels = np.concatenate([np.zeros(members.size), np.ones(others.size)])
    return float(roc_auc_score(labels, np.concatenate([members, others])))


def privleak(auc: float, *, retrained_auc: float) -> float:
    """MUSE's PrivLeak in percent: ``(AUC' - AUC'_retrain) / AUC'_retrain * 100`` with MUSE's ``AUC' = 1 - AUC``
    (``signed_auc``). 0: as private as the retrained model; negative: the forget set still looks trained on
    (under-unlearning); positive: it looks less seen than the retrained model makes it (over-unlearning)."""
    reference = 1.0 - retrained_auc
    if reference <= 0.0:
        raise ValueError("the retrained model's AUC is 1 (its forget set looks fully trained on): PrivLeak is "
                         "undefined; check that the retrained model never saw the forget set")
    return ((1.0 - auc) - reference) / reference * 100.0


def mia_aucs(
    model: nn.Module,
    *,
    forget: Sequence[Mapping[str, torch.Tensor]],
    holdout: Sequence[Mapping[str, torch.Tensor]],
    forget_texts: Sequence[str],
    holdout_texts: Sequence[str],
    pad_token_id: int,
    device: torch.device,
    k: float = DEFAULT_K,
) -> dict[str, Any]:
    """``mia_<attack>_auc`` (``signed_auc``) of every attack, forget items against never-trained holdout items."""
    common: dict[str, Any] = {"pad_token_id": pad_token_id, "device": device}
    members = attack_scores(token_stats(model, forget, **common), forget_texts, k=k)
    others = attack_scores(token_stats(model, holdout, **common), holdout_texts, k=k)
    return {f"mia_{name}_auc": signed_auc(members[name], others[name]) for name in ATTACKS}
