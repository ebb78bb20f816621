"""The language-model membership attacks, OpenUnlearning's signed AUC and MUSE's PrivLeak on hand-made inputs."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from torch import nn

from orthograd.tasks.lm_mia import (
    TokenStats,
    attack_scores,
    min_k_plus_plus_score,
    min_k_score,
    privleak,
    signed_auc,
    token_stats,
    zlib_score,
)

CPU = torch.device("cpu")


def test_signed_auc_reads_which_side_is_more_likely_so_over_forgetting_is_not_remembering():
    seen, unseen = np.array([0.1, 0.2, 0.3]), np.array([1.0, 1.1, 1.2])  # losses: members lower = remembered
    assert signed_auc(seen, unseen) == pytest.approx(1.0)
    assert signed_auc(unseen + 5.0, unseen) == pytest.approx(0.0)  # over-forgotten: far *less* likely than unseen
    assert signed_auc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.5)
    assert signed_auc(np.array([1.0, 3.0]), np.array([2.0])) == pytest.approx(0.5)  # one pair each way
    with pytest.raises(ValueError, match="at least one"):
        signed_auc(np.array([]), unseen)


def test_privleak_is_muses_relative_gap_of_one_minus_auc():
    assert privleak(0.5, retrained_auc=0.5) == pytest.approx(0.0)
    assert privleak(0.9, retrained_auc=0.5) == pytest.approx((0.1 - 0.5) / 0.5 * 100)  # -80: still remembered
    assert privleak(0.2, retrained_auc=0.6) == pytest.approx((0.8 - 0.4) / 0.4 * 100)  # +100: over-forgotten
    with pytest.raises(ValueError, match="undefined"):
        privleak(0.5, retrained_auc=1.0)


def test_min_k_and_min_k_plus_plus_average_the_lowest_fraction_of_token_scores():
    stats = TokenStats(log_probs=np.log([0.5, 0.1, 0.8, 0.05, 0.9]), mu=np.array([-1.0, -2.0, -0.5, -1.0, -0.2]),
                       variance=np.array([1.0, 4.0, 0.25, 1.0, 0.0]), loss=1.3)
    # k = 0.4 of 5 tokens = the 2 lowest log-probabilities: 0.05 and 0.1
    assert min_k_score(stats, k=0.4) == pytest.approx(-(np.log(0.05) + np.log(0.1)) / 2)
    assert min_k_score(stats, k=0.1) == pytest.approx(-np.log(0.05))  # at least one token
    standardised = (stats.log_probs - stats.mu) / np.sqrt(np.maximum(stats.variance, 1e-6))
    lowest = np.sort(standardised)[:2]
    assert min_k_plus_plus_score(stats, k=0.4) == pytest.approx(-lowest.mean())
    assert standardised[4] == pytest.approx((np.log(0.9) + 0.2) / 1e-3)  # a zero variance is floored, not divided by


def test_zlib_divides_the_loss_by_the_compressed_answer_length_and_scores_are_higher_when_unseen():
    stats = TokenStats(log_probs=np.log([0.5]), mu=np.zeros(1), variance=np.ones(1), loss=2.0)
    text = "The capital of France is Paris."
    assert zlib_score(stats, text) == pytest.approx(2.0 / len(zlib.compress(text.encode())))
    confident = TokenStats(log_probs=np.log([0.9, 0.8]), mu=np.array([-0.3, -0.4]), variance=np.ones(2), loss=0.2)
    unsure = TokenStats(log_probs=np.log([0.1, 0.2]), mu=np.array([-0.3, -0.4]), variance=np.ones(2), loss=2.0)
    scores = attack_scores([confident, unsure], [text, text])
    assert all(scores[name][0] < scores[name][1] for name in scores)  # the unsure sequence looks unseen
    with pytest.raises(ValueError, match="k must"):
        attack_scores([confident], [text], k=0.0)


class FixedLM(nn.Module):
    """Logits that depend only on the position: log-probabilities are known in advance."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(logits)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"logits": self.table[: input_ids.shape[1]].unsqueeze(0).expand(input_ids.shape[0], -1, -1)}


def test_token_stats_read_the_answer_tokens_without_the_end_token():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64)
    model = FixedLM(logits)
    # prompt [1, 2], answer [3, 4] and end token 0: the answer tokens sit at positions 2, 3, the end token at 4
    item = {"input_ids": torch.tensor([1, 2, 3, 4, 0]), "labels": torch.tensor([-100, -100, 3, 4, 0])}
    (stats,) = token_stats(model, [item], pad_token_id=0, device=CPU)
    log_p = torch.log_softmax(logits, dim=-1).numpy()
    assert stats.log_probs == pytest.approx([log_p[1, 3], log_p[2, 4]])  # position t predicts token t + 1
    assert stats.loss == pytest.approx(-(log_p[1, 3] + log_p[2, 4] + log_p[3, 0]) / 3)  # the loss keeps the end
    p = np.exp(log_p[1])
    assert stats.mu[0] == pytest.approx((p * log_p[1]).sum())
    assert stats.variance[0] == pytest.approx((p * log_p[1] ** 2).sum() - (p * log_p[1]).sum() ** 2)
