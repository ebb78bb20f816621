"""OrthoGrad's tuning-free (adaptive) schedule: the controller's rule, the held-out retain slice, the defaults
reaching the stop rule's target with no hyperparameters, and runs that miss their target saying so."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import orthograd as og
from orthograd.data import class_forgetting_split, random_forgetting_split
from orthograd.data.splits import labels_of
from orthograd.methods import make_config
from orthograd.methods.orthograd.config import SCHEDULE_DEFAULTS
from orthograd.methods.orthograd.controller import (
    ControllerRule,
    ProgressMeter,
    retain_drop,
    sampling_noise,
    split_holdout,
)


def test_pressure_raises_share_then_lr_and_backs_off_share_then_lr() -> None:
    pressure = ControllerRule(share=0.5, lr=1e-3, max_share=0.9, min_share=0.1, lr_range=4.0)
    assert pressure.update(progressed=False, retain_degraded=False) == "raise"
    assert pressure.share == pytest.approx(0.75) and pressure.lr == 1e-3  # retain share halved, lr kept
    pressure.update(progressed=False, retain_degraded=False)
    pressure.update(progressed=False, retain_degraded=False)
    assert pressure.share == pytest.approx(0.9)  # capped
    pressure.update(progressed=False, retain_degraded=False)
    assert pressure.lr == pytest.approx(2e-3)  # at the largest share, the lr rises
    for _ in range(5):
        pressure.update(progressed=False, retain_degraded=False)
    assert pressure.lr == pytest.approx(4e-3)  # within lr_range
    assert pressure.update(progressed=True, retain_degraded=False) == "hold"
    assert pressure.update(progressed=False, retain_degraded=True) == "back_off"  # damage wins over a stall
    assert pressure.share == pytest.approx(0.45) and pressure.alpha == pytest.approx(0.55)
    for _ in range(3):
        pressure.update(progressed=True, retain_degraded=True)
    assert pressure.share == pytest.approx(0.1)
    pressure.update(progressed=True, retain_degraded=True)
    assert pressure.lr == pytest.approx(2e-3)  # at the smallest share, a raised lr falls back ...
    for _ in range(5):
        pressure.update(progressed=True, retain_degraded=True)
    assert pressure.lr == pytest.approx(1e-3)  # ... but never below its start


def test_sampling_noise_is_two_binomial_standard_errors() -> None:
    assert sampling_noise(metric=90.0, size=100) == pytest.approx(6.0)  # 200 * sqrt(0.9 * 0.1 / 100)
    assert sampling_noise(metric=100.0, size=20) == pytest.approx(200 * (0.975 * 0.025 / 20) ** 0.5)  # off 100%
    assert sampling_noise(metric=90.0, size=400) < sampling_noise(metric=90.0, size=100)


def test_a_raise_waits_for_patience_stalls_in_a_row() -> None:
    pressure = ControllerRule(share=0.5, lr=1e-3, patience=3)
    assert [pressure.update(progressed=False, retain_degraded=False) for _ in range(2)] == ["hold", "hold"]
    assert pressure.update(progressed=True, retain_degraded=False) == "hold"  # progress restarts the count
    actions = [pressure.update(progressed=False, retain_degraded=False) for _ in range(3)]
    assert actions == ["hold", "hold", "raise"] and pressure.share == pytest.approx(0.75)
    with pytest.raises(ValueError, match="patience"):
        ControllerRule(share=0.5, lr=1e-3, patience=0)


def test_pressure_rejects_shares_outside_its_bounds() -> None:
    with pytest.raises(ValueError, match="share"):
        ControllerRule(share=1.0, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        ControllerRule(share=0.5, lr=0.0)


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_progress_is_the_metric_moving_toward_forgetting_or_the_forget_loss_rising(higher_is_better: bool) -> None:
    toward = -1.0 if higher_is_better else 1.0  # accuracy falls / WER rises when a set is forgotten
    meter = ProgressMeter(higher_is_better=higher_is_better)
    assert meter.progressed(forget_metric=50.0, forget_loss=1.0)  # first check: nothing to compare with
    assert meter.progressed(forget_metric=50.0 + toward, forget_loss=1.0)
    assert not meter.progressed(forget_metric=50.0 + toward, forget_loss=1.05)  # neither moved enough
    assert not meter.progressed(forget_metric=50.0, forget_loss=1.05)  # the metric moved the wrong way
    assert meter.progressed(forget_metric=50.0, forget_loss=1.2)  # the loss rose by more than 10%
    assert retain_drop(before=90.0, now=88.0, higher_is_better=higher_is_better) == (2.0 if higher_is_better else -2.0)


def test_holdout_is_a_disjoint_slice_of_the_retain_set() -> None:
    retain = TensorDataset(torch.arange(50.0).unsqueeze(1), torch.zeros(50, dtype=torch.long))
    train_part, holdout = split_holdout(retain, fraction=0.1, generator=torch.Generator().manual_seed(0))
    assert isinstance(train_part, Subset) and isinstance(holdout, Subset)
    assert len(holdout) == 5 and len(train_part) == 45
    assert set(train_part.indices).isdisjoint(holdout.indices)
    assert set(train_part.indices) | set(holdout.indices) == set(range(50))
    single = TensorDataset(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))
    assert split_holdout(single, fraction=0.1, generator=torch.Generator()) == (single, single)


def test_schedules_resolve_their_own_defaults_and_explicit_values_win() -> None:
    adaptive = make_config("orthograd", {})
    assert (adaptive.schedule, adaptive.optimizer, adaptive.alpha) == ("adaptive", "adam", 0.5)
    fixed = make_config("orthograd", {"schedule": "fixed"})
    assert {k: getattr(fixed, k) for k in SCHEDULE_DEFAULTS["fixed"]} == SCHEDULE_DEFAULTS["fixed"]
    assert make_config("orthograd-fixed", {}).to_dict() == fixed.to_dict()
    assert make_config("orthograd", {"schedule": "fixed", "alpha": 0.2, "lr": 0.01}).alpha == 0.2
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_config("orthograd", {"schedule": "auto"})
    with pytest.raises(ValueError, match="adaptive schedule mixes unit-norm terms"):
        make_config("orthograd", {"alpha": 0.0})


def _split(kind: str, train: TensorDataset, seed: int):
    labels = labels_of(train)
    if kind == "class":
        return class_forgetting_split(labels, forget_class=(1, 4, 7)[seed], retain_size=200, seed=seed)
    return random_forgetting_split(labels, forget_size=135, retain_size=200, seed=seed)


@pytest.mark.parametrize("kind", ["class", "random"])
def test_no_hyperparameters_reach_the_target_on_digits_and_keep_the_model(kind: str, digits, digits_model) -> None:
    """The README's call with no hyperparameters forgets, on every seed tried, and keeps test accuracy."""
    train, test = digits
    for seed in (0, 1):
        split = _split(kind, train, seed)
        forget, retain = split.datasets(train)
        result = og.unlearn(digits_model, forget, retain, stop=kind, test=test, seed=seed,
                            forget_classes=split.forget_classes)
        assert result.stop_reason == "target_reached" and result.missed_target is None
        ceiling = result.original["test"] * (0.9 if kind == "class" else 1.0)  # one class of ten gone
        assert result.final["test"] > ceiling - 3.0
        assert result.final["retain"] >= 97.0
        steered = [row for row in result.history[1:] if "alpha" in row]
        assert steered and all(0.0 < row["alpha"] < 1.0 and row["lr"] > 0 for row in steered)


def test_the_controller_raises_pressure_when_forgetting_stalls(digits, digits_model) -> None:
    """Started with almost all of the update on the retain side and a tiny lr, forgetting stalls; the schedule
    then moves the share to forgetting, and the lr up once the share is at its ceiling."""
    train, test = digits
    forget, retain = _split("class", train, 0).datasets(train)
    with pytest.warns(UserWarning, match="raise max_epochs"):
        result = og.unlearn(digits_model, forget, retain, stop="class", test=test, alpha=0.95, lr=1e-6, max_epochs=8)
    controls = [row["control"] for row in result.history[1:]]  # mean decision over the checks of each row
    assert max(controls) > 0.0 and min(controls) >= 0.0  # raises, no back-off
    assert result.history[-1]["alpha"] < 0.5 < result.history[1]["alpha"]  # it started at 0.95


def test_a_missed_target_warns_with_what_was_reached_and_a_hint(digits, digits_model) -> None:
    train, test = digits
    forget, retain = _split("class", train, 0).datasets(train)
    with pytest.warns(UserWarning, match=r"without reaching the 'class' target: forget 100\.00.*try: lower alpha"):
        result = og.unlearn(digits_model, forget, retain, stop="class", test=test, schedule="fixed", max_epochs=1)
    assert result.stop_reason == "max_epochs" and "lower alpha" in (result.missed_target or "")


def test_verbose_prints_a_line_per_evaluation(digits, digits_model, capsys) -> None:
    train, test = digits
    forget, retain = _split("class", train, 0).datasets(train)
    rows: list[dict] = []
    result = og.unlearn(copy.deepcopy(digits_model), forget, retain, stop="class", test=test, verbose="rows",
                        on_eval=rows.append)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(result.history) == len(rows) and lines[0].startswith("step     0 epoch   0")
    assert "alpha" in lines[-1] and "forget" in lines[-1]


def test_an_adaptive_run_cut_short_names_max_epochs(digits, digits_model) -> None:
    train, test = digits
    forget, retain = _split("class", train, 0).datasets(train)
    with pytest.warns(UserWarning, match="try: raise max_epochs"):
        result = og.unlearn(digits_model, forget, retain, stop="class", test=test, alpha=0.95, max_epochs=1)
    assert result.stop_reason == "max_epochs" and result.final["forget"] > 1.0
