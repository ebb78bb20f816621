"""Membership-inference checks against hand-written scikit-learn pipelines, closed-form features and sanity cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.svm import SVC
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from orthograd.privacy import (
    SampleOutputs,
    attack_features,
    loss_attack,
    mia_efficacy,
    mia_loss,
    mia_loss_accuracy,
    mia_loss_auc,
    privacy_metrics,
    sample_outputs,
    svc_efficacy,
)


def test_loss_attack_equals_sklearn_pipeline() -> None:
    rng = np.random.default_rng(1)
    forget, test = rng.gamma(1.0, 0.5, 400), rng.gamma(2.0, 0.8, 400)
    got = loss_attack(forget_losses=forget, test_losses=test, n_splits=5, seed=3)

    features = np.concatenate([test, forget]).reshape(-1, 1)
    labels = np.array([0] * 400 + [1] * 400)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=3)
    accuracy = cross_val_score(LogisticRegression(), features, labels, cv=folds, scoring="accuracy").mean()
    auc = cross_val_score(LogisticRegression(), features, labels, cv=folds, scoring="roc_auc").mean()
    assert got["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert got["auc"] == pytest.approx(auc, abs=1e-12)
    assert 0.6 < got["accuracy"] < 0.95  # overlapping distributions: neither chance nor perfect


def test_loss_attack_sanity_identical_and_separable() -> None:
    rng = np.random.default_rng(0)
    same = loss_attack(forget_losses=rng.exponential(1.0, 2000), test_losses=rng.exponential(1.0, 2000), seed=0)
    assert abs(same["accuracy"] - 0.5) < 0.05 and abs(same["auc"] - 0.5) < 0.05
    apart = loss_attack(forget_losses=rng.uniform(0.0, 0.1, 500), test_losses=rng.uniform(2.0, 3.0, 500), seed=0)
    assert apart["accuracy"] > 0.99 and apart["auc"] > 0.99


def test_loss_attack_balances_classes_by_subsampling() -> None:
    """50 forget vs 5000 test from one distribution: unbalanced, 'always test' would score 0.99; balanced ~0.5."""
    rng = np.random.default_rng(2)
    scores = [
        loss_attack(forget_losses=rng.exponential(1.0, 50), test_losses=rng.exponential(1.0, 5000), seed=s)["accuracy"]
        for s in range(5)
    ]
    assert abs(np.mean(scores) - 0.5) < 0.1
    first = loss_attack(forget_losses=np.arange(50.0), test_losses=np.arange(5000.0) * 0.01, seed=7)
    assert first == loss_attack(forget_losses=np.arange(50.0), test_losses=np.arange(5000.0) * 0.01, seed=7)


def test_loss_attack_rejects_too_few_samples() -> None:
    with pytest.raises(ValueError, match="n_splits"):
        loss_attack(forget_losses=np.ones(3), test_losses=np.ones(10), n_splits=5)


def test_svc_efficacy_equals_sklearn_and_sanity() -> None:
    rng = np.random.default_rng(4)
    members, nonmembers = rng.normal(0.9, 0.05, (300, 1)), rng.normal(0.5, 0.2, (300, 1))
    targets = np.concatenate([rng.normal(0.9, 0.05, (40, 1)), rng.normal(0.5, 0.2, (60, 1))])
    got = svc_efficacy(members=members, nonmembers=nonmembers, targets=targets, seed=0)

    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(np.concatenate([members, nonmembers]), [1] * 300 + [0] * 300)
    assert got == pytest.approx(1.0 - clf.predict(targets).mean(), abs=1e-12)
    assert 0.45 < got < 0.75  # ~60 of 100 targets drawn from the non-member distribution

    like_members = svc_efficacy(members=members, nonmembers=nonmembers, targets=rng.normal(0.9, 0.01, (50, 1)))
    like_unseen = svc_efficacy(members=members, nonmembers=nonmembers, targets=rng.normal(0.2, 0.05, (50, 1)))
    assert like_members < 0.05 and like_unseen > 0.95


def test_attack_features_closed_form() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]])
    outputs = SampleOutputs(losses=-np.log([0.7, 1e-30]), probs=probs, labels=np.array([0, 0]))
    np.testing.assert_allclose(attack_features(outputs, feature="confidence")[:, 0], [0.7, 0.0])
    entropy = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1))
    np.testing.assert_allclose(attack_features(outputs, feature="entropy")[:, 0], [entropy, 0.0], atol=1e-12)
    # m_entropy = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i); row 2: p_y = 0 -> -log(1e-30), p_1 = 1 -> 1e-30
    row1 = -0.3 * np.log(0.7) - 0.2 * np.log(0.8) - 0.1 * np.log(0.9)
    row2 = -np.log(1e-30) - np.log(1e-30)
    np.testing.assert_allclose(attack_features(outputs, feature="m_entropy")[:, 0], [row1, row2], rtol=1e-12)
    seq = SampleOutputs(losses=np.array([0.0, np.log(4.0)]))
    np.testing.assert_allclose(attack_features(seq, feature="confidence")[:, 0], [1.0, 0.25])
    with pytest.raises(ValueError, match="class probabilities"):
        attack_features(seq, feature="entropy")
    with pytest.raises(ValueError, match="feature must be one of"):
        attack_features(outputs, feature="margin")  # type: ignore[arg-type]


def _memorising_setup() -> tuple[nn.Module, TensorDataset, TensorDataset, TensorDataset]:
    """An MLP that memorises random labels: train samples (forget + retain) are members, fresh samples are not."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=generator)
    y = torch.randint(0, 4, (500,), generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(model(x[:300]), y[:300]).backward()
        optimizer.step()
    forget, retain, test = (TensorDataset(x[a:b], y[a:b]) for a, b in ((0, 100), (100, 300), (300, 500)))
    return model.eval(), forget, retain, test


def test_attacks_on_a_model_match_precomputed_losses_and_detect_memorisation() -> None:
    model, forget, retain, test = _memorising_setup()
    with torch.no_grad():
        forget_losses = F.cross_entropy(model(forget.tensors[0]), forget.tensors[1], reduction="none").numpy()
        test_losses = F.cross_entropy(model(test.tensors[0]), test.tensors[1], reduction="none").numpy()
    from_model = mia_loss(model=model, forget=DataLoader(forget, batch_size=32), test=test, seed=1)
    from_arrays = mia_loss(forget=forget_losses, test=test_losses, seed=1)
    assert from_model == pytest.approx(from_arrays, abs=1e-6)
    assert mia_loss_accuracy(model=model, forget=forget, test=test, seed=1) == pytest.approx(from_model["accuracy"])
    assert mia_loss_auc(model=model, forget=forget, test=test, seed=1) == pytest.approx(from_model["auc"])
    assert from_model["accuracy"] > 0.8  # memorised forget samples are easy to tell apart from unseen ones

    outputs = sample_outputs(model, forget)
    with torch.no_grad():
        reference = SampleOutputs.from_logits(model(forget.tensors[0]), forget.tensors[1])
    np.testing.assert_allclose(outputs.probs, reference.probs, atol=1e-6)
    efficacy = mia_efficacy(model=model, forget=forget, retain=retain, test=test, feature="confidence")
    assert efficacy < 0.2  # forget samples look like members: little has been forgotten
    with pytest.raises(ValueError, match="pass model="):
        mia_efficacy(forget=forget, retain=retain, test=test)


def test_privacy_metrics_with_retrained_reference_reports_gaps() -> None:
    model, forget, retain, test = _memorising_setup()
    metrics = privacy_metrics(model, forget=forget, retain=retain, test=test, seed=0)
    assert set(metrics) == {"mia_loss_accuracy", "mia_loss_auc", "mia_efficacy"}
    assert metrics["mia_loss_accuracy"] == pytest.approx(mia_loss_accuracy(model=model, forget=forget, test=test))
    reference = {"mia_loss_accuracy": 0.5, "mia_loss_auc": 0.5, "mia_efficacy": 0.9}
    with_ref = privacy_metrics(model, forget=forget, retain=retain, test=test, seed=0, reference=reference)
    assert with_ref["retrained"] == reference
    for key, value in reference.items():
        assert with_ref["gap"][key] == pytest.approx(abs(metrics[key] - value))
    with pytest.raises(ValueError, match="reference lacks"):
        privacy_metrics(model, forget=forget, retain=retain, test=test, reference={"mia_efficacy": 0.5})


def test_svc_efficacy_caps_training_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    fitted_sizes: list[int] = []

    class RecordingSVC(SVC):
        def fit(self, X, y, sample_weight=None):  # noqa: N803 (sklearn's name)
            fitted_sizes.append(len(X))
            return super().fit(X, y, sample_weight=sample_weight)

    monkeypatch.setattr("orthograd.privacy.SVC", RecordingSVC)
    rng = np.random.default_rng(5)
    members, nonmembers = rng.normal(0.9, 0.02, (400, 1)), rng.normal(0.3, 0.05, (900, 1))
    targets = rng.normal(0.3, 0.05, (30, 1))
    capped = svc_efficacy(members=members, nonmembers=nonmembers, targets=targets, seed=1, max_per_side=40)
    assert capped == svc_efficacy(members=members, nonmembers=nonmembers, targets=targets, seed=1, max_per_side=40)
    assert capped > 0.95
    assert fitted_sizes == [80, 80]
    svc_efficacy(members=members, nonmembers=nonmembers, targets=targets)
    assert fitted_sizes[-1] == 800  # uncapped: balanced to the smaller side (400 members)
    with pytest.raises(ValueError, match="max_per_side"):
        svc_efficacy(members=members, nonmembers=nonmembers, targets=targets, max_per_side=0)
