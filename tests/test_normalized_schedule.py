"""OrthoGrad's "normalized" schedule, the controller's ablation: the adaptive schedule's unit-norm mix of the two
terms with alpha and lr held where they start and no held-out retain slice."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader

import orthograd as og
from orthograd.data import random_forgetting_split
from orthograd.data.splits import labels_of
from orthograd.methods import make_config
from orthograd.methods.orthograd.config import SCHEDULE_DEFAULTS
from orthograd.methods.orthograd.method import OrthoGrad


def test_normalized_has_the_adaptive_defaults_and_its_own_name() -> None:
    config = make_config("orthograd-normalized", {})
    assert config.schedule == "normalized"
    assert {k: getattr(config, k) for k in SCHEDULE_DEFAULTS["adaptive"]} == SCHEDULE_DEFAULTS["adaptive"]
    assert make_config("orthograd", {"schedule": "normalized"}).to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="normalized schedule mixes unit-norm terms"):
        make_config("orthograd-normalized", {"alpha": 0.0})


def _data(digits):
    train, test = digits
    split = random_forgetting_split(labels_of(train), forget_size=120, retain_size=200, seed=0)
    return (*split.datasets(train), test)


def _run(digits, digits_model, method: str, *, on_build=None, **options):
    """A run with no stop rule (2 epochs unless ``options`` say otherwise), and the method object that ran it;
    ``on_build(method)`` sees the method before its first step (its LoRA adapters attached)."""
    forget, retain, test = _data(digits)
    built: list[OrthoGrad] = []

    def keep(cls, config, context):
        built.append(cls(config, context))
        if on_build is not None:
            on_build(built[-1])
        return built[-1]

    options = {"max_epochs": 2, **options}
    result = og.unlearn(copy.deepcopy(digits_model), forget, retain, test=test, method=method, stop="never",
                        device="cpu", seed=0, verbose=False, make_method=keep, **options)
    return result, built[0]


@pytest.mark.parametrize("alpha", [0.3, 0.5])
def test_normalized_update_has_unit_norm_terms_whatever_the_gradient_scale(digits, digits_model, alpha) -> None:
    """The retain mean lies in the retain span and the projected forget gradient is orthogonal to it, so a mix of
    unit-norm terms has norm sqrt(alpha^2 + (1 - alpha)^2); the fixed schedule's raw mix does not."""
    expected = math.hypot(alpha, 1 - alpha)
    forget, retain, _ = _data(digits)
    forget_batch = next(iter(DataLoader(forget, batch_size=32)))
    retain_batch = next(iter(DataLoader(retain, batch_size=64)))
    norms: dict[str, float] = {}

    def measure(method: OrthoGrad) -> None:
        update, stats = method.update_direction(forget_batch, retain_batch)
        assert stats["alpha"] == alpha
        norms[method.config.schedule] = torch.sqrt(sum((u.double() ** 2).sum() for u in update.values())).item()

    for method in ("orthograd-normalized", "orthograd-fixed"):
        _run(digits, digits_model, method, on_build=measure, alpha=alpha, max_epochs=None, max_steps=1)
    assert norms["normalized"] == pytest.approx(expected, rel=1e-3)
    assert abs(norms["fixed"] - expected) > 0.05 * expected


def test_normalized_never_moves_alpha_or_lr_and_holds_nothing_out(digits, digits_model) -> None:
    result, built = _run(digits, digits_model, "orthograd-normalized", lr=2e-3)
    assert built.controller is None and built.controller_actions == {} and built.holdout() is None
    steps = [row for row in result.history if "alpha" in row]
    assert result.steps == 2 * 4 and len(steps) >= 2  # 120 / 32 -> 4 steps an epoch, nothing stops it
    assert {row["alpha"] for row in steps} == {0.5} and {row["lr"] for row in steps} == {2e-3}
    assert not any("control" in row or "holdout_retain" in row for row in result.history)
    adaptive_result, adaptive = _run(digits, digits_model, "orthograd", lr=2e-3)
    assert sum(adaptive.controller_actions.values()) > 0  # the adaptive run's controller did check
    assert any("holdout_retain" in row for row in adaptive_result.history)
