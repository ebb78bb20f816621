"""unlearn() end to end on real digits: stopping rules, history, untouched input, clear errors."""

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import orthograd as og
from orthograd.data import class_forgetting_split, random_forgetting_split
from orthograd.data.splits import labels_of
from orthograd.models import SmallCNN


def _class_split(train, forget_class=3):
    split = class_forgetting_split(labels_of(train), forget_class=forget_class, retain_size=200, seed=0)
    return split.datasets(train)


def test_class_forgetting_reaches_target_and_leaves_input_untouched(digits, digits_model):
    train, test = digits
    forget, retain = _class_split(train)
    before = copy.deepcopy(digits_model.state_dict())
    result = og.unlearn(
        digits_model, forget, retain, test=test, stop="class", optimizer="adam", lr=1e-3, alpha=0.8,
        forget_batch_size=32, retain_batch_size=64, eval_every=1, seed=0,
    )
    assert result.stop_reason == "target_reached"
    assert result.final["forget"] < 1.0
    assert result.final["test"] > 80.0  # 9 of 10 classes still recognised
    assert result.history[0]["step"] == 0 and result.history[0]["forget"] > 95.0
    assert [row["step"] for row in result.history] == sorted(row["step"] for row in result.history)
    # eval_every=1 probes the forget set each step; only epoch ends and the stopping step become (full) rows
    assert all({"forget", "retain", "test"} <= set(row) for row in result.history)
    assert len(result.history) <= result.epochs + 2 < result.steps + 1
    for key, value in before.items():
        assert torch.equal(value, digits_model.state_dict()[key]), key
    assert type(result.model) is SmallCNN
    assert not any("lora" in name for name, _ in result.model.named_parameters())


def test_random_forgetting_rule_and_determinism(digits, digits_model):
    train, test = digits
    split = random_forgetting_split(labels_of(train), forget_size=130, retain_size=200, seed=1)
    forget, retain = split.datasets(train)
    kwargs = dict(test=test, stop="random", optimizer="adam", lr=1e-3, alpha=0.5, forget_batch_size=32,
                  retain_batch_size=64, eval_every=1, seed=3, max_epochs=10)
    first = og.unlearn(digits_model, forget, retain, **kwargs)
    second = og.unlearn(digits_model, forget, retain, **kwargs)
    original_test = first.original["test"]
    if first.stop_reason == "target_reached":
        assert first.final["forget"] <= original_test + 0.5
    else:
        assert first.stop_reason == "max_epochs" and first.epochs == 10
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)  # same seed and data: bit-identical on CPU


def test_max_epochs_without_stop_rule_and_one_epoch_counts(digits, digits_model):
    train, test = digits
    forget, retain = _class_split(train, forget_class=5)
    result = og.unlearn(digits_model, DataLoader(forget, batch_size=100), retain, max_epochs=2, lr=1e-4)
    assert result.stop_reason == "max_epochs" and result.epochs == 2
    assert result.steps == 2 * math.ceil(len(forget) / 100)
    assert "test" not in result.final  # no test set given, none reported


def test_inplace_modifies_the_given_model(digits, digits_model):
    train, _ = digits
    forget, retain = _class_split(train, forget_class=1)
    model = copy.deepcopy(digits_model)
    reference = copy.deepcopy(model.state_dict())
    result = og.unlearn(model, forget, retain, max_epochs=1, lr=1e-2, lora=None, inplace=True)
    assert result.model is model
    assert any(not torch.equal(reference[k], v) for k, v in model.state_dict().items())


def test_bad_input_gets_clear_errors(digits, digits_model):
    train, test = digits
    forget, retain = _class_split(train)
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="forget set is empty"):
        og.unlearn(digits_model, empty, retain)
    with pytest.raises(ValueError, match="pass test="):
        og.unlearn(digits_model, forget, retain, stop="random")
    with pytest.raises(ValueError, match="unknown method"):
        og.unlearn(digits_model, forget, retain, method="forget-it-all")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        og.unlearn(digits_model, forget, retain, alhpa=0.3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            og.unlearn(digits_model, forget, retain, device="cuda")
    with pytest.raises(ValueError, match="stop must be"):
        og.unlearn(digits_model, forget, retain, stop="sometime")


def test_non_finite_loss_stops_and_keeps_last_good_state(digits, digits_model):
    train, _ = digits
    forget, retain = _class_split(train)
    calls = {"n": 0}

    class NaNAfter(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls["n"] += 1
            out = self.inner(x)
            return out * float("nan") if calls["n"] > 12 else out

    model = NaNAfter(copy.deepcopy(digits_model))
    result = og.unlearn(model, forget, retain, max_epochs=5, lr=1e-3,
                        forget_batch_size=32, retain_batch_size=32)
    assert result.stop_reason == "non_finite"
    assert "non_finite_step" in result.history[-1]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
