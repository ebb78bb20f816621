"""TOFU's metrics (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning"), on any causal LM and QA pairs.

As TOFU's evaluation code computes them, with "probability" the length-normalised ``P(a | q)^(1/|a|)``:

- answer probability and ROUGE-L recall (Porter stemmer on) of the greedy answer, generated up to
  ``max_new_tokens`` (TOFU: 200) or the end token (``CausalLMTask``);
- on the sets of knowledge the model had before (TOFU's Real Authors and World Facts) the probability is
  option-normalised: ``P(a)^(1/|a|) / (P(a)^(1/|a|) + sum_k P(wrong_k)^(1/|wrong_k|))``;
- truth ratio per question: ``R = P(paraphrase)^(1/n) / mean-in-log of P(perturbed)^(1/n)``, i.e.
  ``exp(mean_k loss(perturbed_k) - loss(paraphrase))``: above 1 when the model prefers the correct answer (TOFU's
  logs store the inverse, ``1/R``);
- forget quality: the p-value of a two-sample Kolmogorov-Smirnov test between the truth ratios of the unlearned
  model and of a model retrained without the forget set, on the forget questions (high: indistinguishable);
- model utility: the harmonic mean of answer probability, ROUGE-L and truth score ``mean(max(0, 1 - 1/R))`` on
  each retained set; TOFU's nine numbers with the retain, real-people and world-facts sets.

``TruthRatioRule`` is TOFU's forget-quality reading as a stop rule for users without a retrained model: stop once
the forget questions' truth ratios are indistinguishable (KS test) from those of questions the model never saw.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from orthograd.tasks import batches
from orthograd.tasks.causal_lm import DEFAULT_MAX_NEW_TOKENS, CausalLMTask
from orthograd.tasks.qa_text import QAEncoder

EVAL_BATCH_SIZE = 64
TRUTH_RATIO_KS_LEVEL = 0.05  # the KS test's level: p >= 0.05 reads as "indistinguishable"
PACE_TOLERANCE_POINTS = 0.5  # as stop="random": the answer-probability level the forget set heads for, plus this


class QA(Protocol):
    """What the metrics read of a question/answer pair (``orthograd.data.authors.QAPair`` has it). Read-only, so
    a frozen dataclass matches."""

    @property
    def question(self) -> str: ...

    @property
    def answer(self) -> str: ...

    @property
    def paraphrase(self) -> str: ...

    @property
    def perturbed(self) -> tuple[str, ...]: ...


def answer_losses(
    model: nn.Module, questions: Sequence[str], answers: Sequence[str], *, encoder: QAEncoder, device: torch.device
) -> np.ndarray:
    """Mean answer-token cross-entropy of each (question, answer); ``exp(-loss)`` is the normalised probability."""
    task = CausalLMTask(pad_token_id=encoder.pad_token_id)
    items = [encoder.item(q, a) for q, a in zip(questions, answers, strict=True)]
    loader = DataLoader(batches.as_dataset(items), batch_size=EVAL_BATCH_SIZE, collate_fn=task.collate_fn())
    losses: np.ndarray = task.sequence_losses(model, loader, device=device).double().numpy()
    return losses


def truth_ratios(model: nn.Module, pairs: Sequence[QA], *, encoder: QAEncoder, device: torch.device) -> np.ndarray:
    """TOFU's truth ratio of each pair (above 1: the paraphrased true answer beats the perturbed ones)."""
    questions = [p.question for p in pairs]
    paraphrase = answer_losses(model, questions, [p.paraphrase for p in pairs], encoder=encoder, device=device)
    counts = {len(p.perturbed) for p in pairs}
    if len(counts) != 1:
        raise ValueError(f"every pair needs the same number of perturbed answers, got {sorted(counts)}")
    k = counts.pop()
    perturbed = answer_losses(
        model, [q for q in questions for _ in range(k)], [a for p in pairs for a in p.perturbed], encoder=encoder,
        device=device,
    ).reshape(len(pairs), k)
    ratios: np.ndarray = np.exp(perturbed.mean(axis=1) - paraphrase)
    return ratios


def truth_score(ratios: np.ndarray) -> float:
    """TOFU's truth-ratio entry of model utility: ``mean(max(0, 1 - 1/R))`` (0 when the wrong answers win)."""
    return float(np.maximum(0.0, 1.0 - 1.0 / ratios).mean())


def forget_quality(unlearned: np.ndarray, retrained: np.ndarray, *, inverted: bool) -> float:
    """KS-test p-value between forget-set truth ratios of the unlearned and the retrained model.

    ``inverted`` says how ``retrained`` is stored: False for this module's ``R`` (``truth_ratios``), True for
    TOFU's logged ``1/R``, which is turned back here; it has no default because the p-value of the wrong one is
    silently wrong."""
    from scipy.stats import ks_2samp

    reference = np.asarray(retrained, dtype=np.float64)
    if reference.size == 0 or not np.all(np.isfinite(reference) & (reference > 0)):
        raise ValueError("retrained truth ratios must be positive finite numbers (P(true) / P(false) per question)")
    return float(ks_2samp(unlearned, 1.0 / reference if inverted else reference).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean (0 if any value is 0, as TOFU's model utility)."""
    array = np.asarray(values, dtype=np.float64)
    if (array <= 0).any():
        return 0.0
    return float(len(array) / (1.0 / array).sum())


def option_probabilities(
    model: nn.Module, pairs: Sequence[QA], *, encoder: QAEncoder, device: torch.device
) -> np.ndarray:
    """TOFU's probability on multiple-choice-like sets: each answer's normalised probability over itself and its
    wrong options (``perturbed``)."""
    questions = [p.question for p in pairs]
    true = np.exp(-answer_losses(model, questions, [p.answer for p in pairs], encoder=encoder, device=device))
    wrong = np.exp(-answer_losses(model, [p.question for p in pairs for _ in p.perturbed],
                                  [a for p in pairs for a in p.perturbed], encoder=encoder, device=device))
    ends = np.cumsum([len(p.perturbed) for p in pairs])
    wrong_sums = np.array([chunk.sum() for chunk in np.split(wrong, ends[:-1])])
    probabilities: np.ndarray = true / (true + wrong_sums)
    return probabilities


def qa_scores(
    model: nn.Module,
    pairs: Sequence[QA],
    *,
    encoder: QAEncoder,
    device: torch.device,
    normalised: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """Answer probability (option-normalised when ``normalised``), ROUGE-L recall (fractions) and truth ratios of
    ``model`` on ``pairs``."""
    task = CausalLMTask(pad_token_id=encoder.pad_token_id, eos_token_id=encoder.eos_token_id, decode=encoder.decode,
                        max_new_tokens=max_new_tokens)
    items = [encoder.item(p.question, p.answer) for p in pairs]
    loader = DataLoader(batches.as_dataset(items), batch_size=EVAL_BATCH_SIZE, collate_fn=task.collate_fn())
    if normalised:
        probability = float(option_probabilities(model, pairs, encoder=encoder, device=device).mean())
    else:
        probability = float(task.sequence_losses(model, loader, device=device).neg().exp().mean())
    rouge = float(task.rouge_l(model, loader, device=device).mean())
    ratios = truth_ratios(model, pairs, encoder=encoder, device=device)
    return {"probability": probability, "rouge_l": rouge, "truth_ratios": ratios}


def tofu_metrics(
    model: nn.Module,
    *,
    forget: Sequence[QA],
    retained: Mapping[str, Sequence[QA]],
    encoder: QAEncoder,
    device: torch.device,
    normalised: Collection[str] = (),
    retrained_forget_ratios: np.ndarray | None = None,
    reference_inverted: bool | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> dict[str, float]:
    """TOFU's table entries: forget probability / ROUGE-L / truth ratio, model utility over the ``retained`` sets
    (TOFU: ``{"retain": ..., "real_authors": ..., "world_facts": ...}``, the last two named in ``normalised``) and
    forget quality when the retrained model's ratios are given (``reference_inverted``: see ``forget_quality``)."""
    if unknown := set(normalised) - set(retained):
        raise ValueError(f"normalised names sets that are not retained sets: {sorted(unknown)}")
    if retrained_forget_ratios is not None and reference_inverted is None:
        raise ValueError("say how the retrained truth ratios are stored: reference_inverted=False for R = "
                         "P(true)/P(false) (truth_ratios), True for TOFU's logged 1/R")
    common: dict[str, Any] = {"encoder": encoder, "device": device, "max_new_tokens": max_new_tokens}
    forget_scores = qa_scores(model, forget, **common)
    ratios = forget_scores["truth_ratios"]
    out = {
        "forget_probability": forget_scores["probability"],
        "forget_rouge_l": forget_scores["rouge_l"],
        "forget_truth_ratio": float(np.minimum(ratios, 1.0 / ratios).mean()),  # TOFU's forget-set "Truth Ratio"
    }
    parts: list[float] = []
    for name, pairs in retained.items():
        scores = qa_scores(model, pairs, normalised=name in normalised, **common)
        entries = {"probability": scores["probability"], "rouge_l": scores["rouge_l"],
                   "truth": truth_score(scores["truth_ratios"])}
        out.update({f"{name}_{key}": value for key, value in entries.items()})
        parts.extend(entries.values())
    out["model_utility"] = harmonic_mean(parts)
    if retrained_forget_ratios is not None:
        out["forget_quality"] = forget_quality(ratios, retrained_forget_ratios, inverted=bool(reference_inverted))
    return out


class TruthRatioRule:
    """Stop once the forget set's truth-ratio distribution is indistinguishable from the never-seen set's.

    At each check the rule measures TOFU's truth ratio of every forget and every never-seen QA pair under the
    model being unlearned and runs a two-sample Kolmogorov-Smirnov test between the two sets of ratios; it fires
    when the p-value reaches ``level`` (0.05: the test no longer tells the forget questions from questions the
    model never learnt). This is TOFU's forget quality with the never-seen questions standing in for a model
    retrained without the forget set, for users who have none. The metric it reads is ``metric``
    ("truth_ratio_ks_p", written into every history row by the runner through ``measure``), its direction
    higher-is-forgotten. With ``original`` (the model before unlearning), ``target`` is the never-seen answers'
    mean answer probability under it plus half a point: the forget answer probability OrthoGrad's adaptive
    schedule paces its pressure on (the p-value itself jumps too abruptly to pace on).
    """

    metric: str = "truth_ratio_ks_p"
    higher_is_better: bool = True
    needs: tuple[str, ...] = ("forget",)  # the checks also evaluate the forget set's answer probability

    def __init__(
        self,
        *,
        forget: Sequence[QA],
        never_seen: Sequence[QA],
        encoder: QAEncoder,
        level: float = TRUTH_RATIO_KS_LEVEL,
        original: nn.Module | None = None,
    ) -> None:
        if not forget or not never_seen:
            raise ValueError("TruthRatioRule needs forget and never_seen QA pairs (each with paraphrase and "
                             "perturbed answers)")
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        self.forget, self.never_seen, self.encoder, self.level = list(forget), list(never_seen), encoder, level
        self.target: float | None = None
        if original is not None:
            device = _device_of(original)
            losses = answer_losses(original, [p.question for p in self.never_seen],
                                   [p.answer for p in self.never_seen], encoder=encoder, device=device)
            self.target = 100.0 * float(np.exp(-losses).mean()) + PACE_TOLERANCE_POINTS

    def measure(self, model: nn.Module) -> dict[str, float]:
        """The KS p-value between the forget and never-seen truth ratios of ``model``, keyed by ``metric``."""
        device = _device_of(model)
        forget = truth_ratios(model, self.forget, encoder=self.encoder, device=device)
        never_seen = truth_ratios(model, self.never_seen, encoder=self.encoder, device=device)
        return {self.metric: forget_quality(forget, never_seen, inverted=False)}

    def __call__(self, row: Mapping[str, Any]) -> bool:
        return bool(row[self.metric] >= self.level)

    def __repr__(self) -> str:
        return f"TruthRatioRule({self.metric} >= {self.level})"


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
