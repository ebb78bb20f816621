"""Membership-inference checks: does the forget set still look like training data to an attacker?

Two attacks the unlearning literature reports, both as fractions in [0, 1]:

- **Loss attack** (NeurIPS 2023 unlearning challenge kit, SCRUB): a logistic regression on the per-sample loss
  separates forget samples (label 1) from test samples (label 0); the larger set is subsampled (seeded) so both
  classes are equally large, and the score is the stratified k-fold cross-validated accuracy (or ROC AUC).
  0.5 means the forget set is indistinguishable from unseen data; higher means it can be told apart, on either
  side: the classifier learns which side has the lower loss, so a forget set made far *less* likely than unseen
  data (over-forgetting) also scores high. The signed AUC of ``orthograd.tasks.lm_mia`` (OpenUnlearning's, used by
  the language-model benchmark) keeps the side: 1 remembered, 0.5 unseen, below 0.5 over-forgotten.
- **MIA-efficacy** (SalUn): an RBF SVC (C=3, gamma="auto", as SalUn) is fitted on confidence-based features of
  retain samples (members) against test samples (non-members), balanced by seeded subsampling; the efficacy is the
  fraction of forget samples it predicts as non-members. Higher means more forgotten; a retrained model is the
  reference. Features: "confidence" (probability of the true class), "entropy" of the softmax, or "m_entropy"
  (Song & Mittal's modified entropy, which also uses the label).

Every attack accepts either data (a ``Dataset`` or ``DataLoader``, scored with ``model`` under ``task``) or
precomputed per-sample outputs (a ``SampleOutputs``; the loss attack also takes a 1-D array of losses).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.svm import SVC
from torch import nn
from torch.utils.data import DataLoader, Dataset

from orthograd.choices import check_choice
from orthograd.runtime import resolve_device
from orthograd.tasks import Task, get_task
from orthograd.tasks.base import per_sample_cross_entropy

Feature = Literal["confidence", "entropy", "m_entropy"]
DEFAULT_BATCH_SIZE = 512
_LOG_FLOOR = 1e-30  # log of a zero probability is taken as log(1e-30), so features stay finite
PRIVACY_KEYS: tuple[str, ...] = ("mia_loss_accuracy", "mia_loss_auc", "mia_efficacy")
SVC_C = 3.0  # SalUn's attack classifier: SVC(C=3, gamma="auto", kernel="rbf")


@dataclass(frozen=True)
class SampleOutputs:
    """What the attacks need from a model on one set: per-sample losses ``[n]``; for classification also the
    softmax probabilities ``[n, C]`` and the labels ``[n]`` (sequence tasks have losses only)."""

    losses: np.ndarray
    probs: np.ndarray | None = None
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        losses = np.asarray(self.losses, dtype=np.float64)
        if losses.ndim != 1 or losses.size == 0:
            raise ValueError(f"losses must be a non-empty 1-D array, got shape {losses.shape}")
        if not np.all(np.isfinite(losses)):
            raise ValueError("losses contain NaN or inf; the model's outputs are not usable for an attack")
        object.__setattr__(self, "losses", losses)
        if (self.probs is None) != (self.labels is None):
            raise ValueError("give probs and labels together (or neither)")
        if self.probs is not None:
            probs = np.asarray(self.probs, dtype=np.float64)
            labels = np.asarray(self.labels, dtype=np.int64)
            if probs.ndim != 2 or probs.shape[0] != losses.size or labels.shape != losses.shape:
                raise ValueError(
                    f"probs must be [n, C] and labels [n] with n = {losses.size}; got {probs.shape} and {labels.shape}"
                )
            object.__setattr__(self, "probs", probs)
            object.__setattr__(self, "labels", labels)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, labels: torch.Tensor) -> SampleOutputs:
        """Outputs of a classifier from its logits ``[n, C]`` and labels ``[n]``."""
        logits = logits.detach().double()
        losses = per_sample_cross_entropy(logits, labels)
        return cls(
            losses=losses.cpu().numpy(),
            probs=torch.softmax(logits, dim=-1).cpu().numpy(),
            labels=labels.cpu().numpy(),
        )

    def __len__(self) -> int:
        return int(self.losses.size)


Data = Dataset | DataLoader
Source = Data | SampleOutputs


@torch.no_grad()
def sample_outputs(
    model: nn.Module,
    data: Data,
    *,
    task: str | Task = "classification",
    device: str | torch.device | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> SampleOutputs:
    """Per-sample losses (and, for ``[B, C]`` logits, softmax probabilities and labels) of ``model`` on ``data``,
    computed in eval mode on ``device`` (default: where the model's parameters are); the model's train/eval mode
    is restored afterwards."""
    adapter = get_task(task)
    if device is None:
        target = next((p.device for p in model.parameters()), torch.device("cpu"))
    else:
        target = resolve_device(device)
        model.to(target)
    loader = data if isinstance(data, DataLoader) else DataLoader(
        data, batch_size=batch_size, shuffle=False, collate_fn=adapter.collate_fn()
    )
    was_training = model.training
    model.eval()
    losses, probs, labels = [], [], []
    try:
        for batch in loader:
            batch = adapter.to_device(batch, target)
            logits = adapter.logits(model, batch).double()
            targets = adapter.targets(batch)
            losses.append(per_sample_cross_entropy(logits, targets).cpu())
            if logits.dim() == 2:
                probs.append(torch.softmax(logits, dim=-1).cpu())
                labels.append(targets.cpu())
    finally:
        model.train(was_training)
    if not losses:
        raise ValueError("cannot run a membership attack on an empty set")
    return SampleOutputs(
        losses=torch.cat(losses).numpy(),
        probs=torch.cat(probs).numpy() if probs else None,
        labels=torch.cat(labels).numpy() if labels else None,
    )


def _outputs(source: Source, *, model: nn.Module | None, task: str | Task, device: Any, name: str) -> SampleOutputs:
    if isinstance(source, SampleOutputs):
        return source
    if model is None:
        raise ValueError(f"{name} is data, so pass model= to score it (or pass precomputed SampleOutputs)")
    return sample_outputs(model, source, task=task, device=device)


def _balanced(a: np.ndarray, b: np.ndarray, *, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Subsample the larger of two sample arrays (rows) to the size of the smaller, without replacement."""
    n = min(len(a), len(b))
    return _subsample(a, n, rng=rng), _subsample(b, n, rng=rng)


def _subsample(x: np.ndarray, n: int, *, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) == n else x[np.sort(rng.choice(len(x), size=n, replace=False))]


def _log(x: np.ndarray) -> np.ndarray:
    """Natural log with zero probabilities floored at ``_LOG_FLOOR``."""
    return np.log(np.maximum(x, _LOG_FLOOR))


def loss_attack(
    *,
    forget_losses: np.ndarray,
    test_losses: np.ndarray,
    n_splits: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Cross-validated loss attack on precomputed losses: ``{"accuracy": ..., "auc": ...}`` (fractions).

    Forget is the positive class (1), test the negative (0); the larger set is subsampled with ``seed``, and the
    folds are ``StratifiedKFold(n_splits, shuffle=True, random_state=seed)``.
    """
    forget = np.asarray(forget_losses, dtype=np.float64).reshape(-1)
    test = np.asarray(test_losses, dtype=np.float64).reshape(-1)
    rng = np.random.default_rng(seed)
    forget, test = _balanced(forget, test, rng=rng)
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    if len(forget) < n_splits:
        raise ValueError(
            f"the loss attack needs at least n_splits={n_splits} samples per class, got {len(forget)}; "
            "use more forget/test samples or a smaller n_splits"
        )
    features = np.concatenate([test, forget]).reshape(-1, 1)
    members = np.concatenate([np.zeros(len(test), dtype=int), np.ones(len(forget), dtype=int)])
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    scores = cross_validate(LogisticRegression(), features, members, cv=folds, scoring=("accuracy", "roc_auc"))
    return {"accuracy": float(np.mean(scores["test_accuracy"])), "auc": float(np.mean(scores["test_roc_auc"]))}


def _losses_of(source: Source | np.ndarray, **kwargs: Any) -> np.ndarray:
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source, dtype=np.float64)
    return _outputs(source, **kwargs).losses


def mia_loss(
    *,
    forget: Source | np.ndarray,
    test: Source | np.ndarray,
    model: nn.Module | None = None,
    task: str | Task = "classification",
    n_splits: int = 5,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Loss attack (accuracy and AUC) on data scored by ``model``, or on precomputed losses / ``SampleOutputs``."""
    common: dict[str, Any] = {"model": model, "task": task, "device": device}
    return loss_attack(
        forget_losses=_losses_of(forget, name="forget", **common),
        test_losses=_losses_of(test, name="test", **common),
        n_splits=n_splits,
        seed=seed,
    )


def mia_loss_accuracy(**kwargs: Any) -> float:
    """Cross-validated accuracy of the loss attack (0.5: forget looks unseen). Arguments as ``mia_loss``."""
    return mia_loss(**kwargs)["accuracy"]


def mia_loss_auc(**kwargs: Any) -> float:
    """Cross-validated ROC AUC of the loss attack (0.5: forget looks unseen). Arguments as ``mia_loss``."""
    return mia_loss(**kwargs)["auc"]


def attack_features(outputs: SampleOutputs, *, feature: Feature = "confidence") -> np.ndarray:
    """SalUn-style attack features ``[n, 1]``.

    confidence: p_y (for sequence tasks, which have no class probabilities: exp(-loss), the geometric mean of the
    token probabilities); entropy: -sum_i p_i log p_i; m_entropy (Song & Mittal 2021):
    -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i).
    """
    check_choice("feature", feature, Feature)
    if outputs.probs is None or outputs.labels is None:
        if feature != "confidence":
            raise ValueError(f"feature {feature!r} needs class probabilities; this task only gives losses")
        return np.exp(-outputs.losses).reshape(-1, 1)
    probs, rows = outputs.probs, np.arange(len(outputs))
    p_true = probs[rows, outputs.labels]
    if feature == "confidence":
        return p_true.reshape(-1, 1)
    if feature == "entropy":
        return -(probs * _log(probs)).sum(axis=1).reshape(-1, 1)
    others = probs * _log(1.0 - probs)
    others[rows, outputs.labels] = 0.0
    return (-(1.0 - p_true) * _log(p_true) - others.sum(axis=1)).reshape(-1, 1)


def svc_efficacy(
    *,
    members: np.ndarray,
    nonmembers: np.ndarray,
    targets: np.ndarray,
    seed: int = 0,
    max_per_side: int | None = None,
) -> float:
    """Fraction of ``targets`` that an RBF SVC fitted on ``members`` (1) vs ``nonmembers`` (0) calls non-members.

    Inputs are feature arrays ``[n, d]``; the larger training side is subsampled to the smaller one with ``seed``,
    and both to ``max_per_side`` when given (SVC fitting is quadratic: ~20 s for 10k per side on one CPU core).
    """
    if max_per_side is not None and max_per_side < 1:
        raise ValueError(f"max_per_side must be >= 1 or None, got {max_per_side}")
    rng = np.random.default_rng(seed)
    members, nonmembers = _balanced(np.asarray(members), np.asarray(nonmembers), rng=rng)
    if max_per_side is not None and len(members) > max_per_side:
        members, nonmembers = (_subsample(x, max_per_side, rng=rng) for x in (members, nonmembers))
    features = np.concatenate([members, nonmembers]).reshape(2 * len(members), -1)
    labels = np.concatenate([np.ones(len(members), dtype=int), np.zeros(len(nonmembers), dtype=int)])
    classifier = SVC(C=SVC_C, gamma="auto", kernel="rbf").fit(features, labels)
    predicted = classifier.predict(np.asarray(targets).reshape(len(targets), -1))
    return float(1.0 - predicted.mean())


def mia_efficacy(
    *,
    forget: Source,
    retain: Source,
    test: Source,
    model: nn.Module | None = None,
    task: str | Task = "classification",
    feature: Feature = "confidence",
    seed: int = 0,
    max_per_side: int | None = None,
    device: str | torch.device | None = None,
) -> float:
    """SalUn's MIA-efficacy: the fraction of forget samples an SVC (retain = members, test = non-members, on
    ``feature``) predicts as non-members. Higher: more forgotten; compare with a retrained model's value."""
    common: dict[str, Any] = {"model": model, "task": task, "device": device}
    features = {
        name: attack_features(_outputs(source, name=name, **common), feature=feature)
        for name, source in (("forget", forget), ("retain", retain), ("test", test))
    }
    return svc_efficacy(
        members=features["retain"],
        nonmembers=features["test"],
        targets=features["forget"],
        seed=seed,
        max_per_side=max_per_side,
    )


def privacy_metrics(
    model: nn.Module,
    *,
    forget: Data,
    retain: Data,
    test: Data,
    task: str | Task = "classification",
    feature: Feature = "confidence",
    n_splits: int = 5,
    seed: int = 0,
    max_per_side: int | None = None,
    device: str | torch.device | None = None,
    reference: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every privacy metric of one model, for ``record["privacy"]``.

    Returns ``{"mia_loss_accuracy", "mia_loss_auc", "mia_efficacy"}`` (fractions). With ``reference`` (this
    function's result for a model retrained without the forget set) it also holds ``"retrained"`` (those values)
    and ``"gap"``: the absolute difference of each metric to the retrained model's. ``max_per_side`` caps the
    SVC's training sets (see ``svc_efficacy``).
    """
    outputs = {
        name: sample_outputs(model, data, task=task, device=device)
        for name, data in (("forget", forget), ("retain", retain), ("test", test))
    }
    attack = mia_loss(forget=outputs["forget"], test=outputs["test"], n_splits=n_splits, seed=seed)
    metrics: dict[str, Any] = {
        "mia_loss_accuracy": attack["accuracy"],
        "mia_loss_auc": attack["auc"],
        "mia_efficacy": mia_efficacy(forget=outputs["forget"], retain=outputs["retain"], test=outputs["test"],
                                     feature=feature, seed=seed, max_per_side=max_per_side),
    }
    if reference is not None:
        missing = [key for key in PRIVACY_KEYS if key not in reference]
        if missing:
            raise ValueError(f"reference lacks {missing}: pass privacy_metrics(...) of the retrained model")
        values = {key: float(reference[key]) for key in PRIVACY_KEYS}
        metrics["retrained"] = values
        metrics["gap"] = {key: abs(metrics[key] - values[key]) for key in PRIVACY_KEYS}
    return metrics
