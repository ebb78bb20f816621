"""No wrong "success": padding from the model, stop rules that fit the task, retain damage flagged, an inferred
stop rule, PeftModel inputs, and bad labels / devices / models / optimizer options refused up front."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import orthograd as og
from orthograd.damage import HOLDOUT_SET, DamageCheck, HoldoutReading, RetainDamageWarning
from orthograd.data import class_forgetting_split, random_forgetting_split
from orthograd.data.splits import labels_of
from orthograd.stopping import (
    _RULES,
    ForgetMetricRule,
    StopRuleSpec,
    register_stop_rule,
    stalled_at,
    wer_target_rule,
)
from orthograd.tasks import ClassificationTask

VOCAB = 20


def _class_split(train, forget_class=3):
    return class_forgetting_split(labels_of(train), forget_class=forget_class, retain_size=200, seed=0).datasets(train)


def _gpt2_classifier(pad_token_id: int | None):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16, num_labels=3,
                        pad_token_id=pad_token_id)
    return GPT2ForSequenceClassification(config).eval()


def _token_items(n: int, *, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n,), generator=gen).tolist()
    return [{"input_ids": torch.randint(2, VOCAB, (k,), generator=gen), "labels": torch.tensor(i % 3)}
            for i, k in enumerate(lengths)]


# --- padding -------------------------------------------------------------------------------------------------------


def test_padding_takes_the_models_pad_token_id_and_evaluate_scores_as_samples_alone():
    model = _gpt2_classifier(pad_token_id=1)
    items = _token_items(24, seed=0)
    with torch.no_grad():
        alone = torch.stack([model(input_ids=item["input_ids"][None]).logits[0].argmax() for item in items])
    expected = 100.0 * float((alone == torch.stack([item["labels"] for item in items])).float().mean())
    assert og.evaluate(model, items, batch_size=8)["accuracy"] == pytest.approx(expected)
    batch = ClassificationTask().for_model(model).collate_fn()(items[:4])
    lengths = [len(item["input_ids"]) for item in items[:4]]
    for row, length in zip(batch["input_ids"], lengths, strict=True):
        assert (row[length:] == 1).all()  # padded with the config's id, not 0


def test_the_tokenizers_pad_id_is_used_when_the_config_has_none_and_disagreements_are_errors(digits):
    tokenizer = types.SimpleNamespace(pad_token_id=5)
    free = _gpt2_classifier(pad_token_id=None)
    task = ClassificationTask(tokenizer=tokenizer).for_model(free)
    assert task.pad_token_id == 5
    assert ClassificationTask().for_model(free).pad_token_id == 0  # nothing known: 0, with an attention mask
    model = _gpt2_classifier(pad_token_id=1)
    with pytest.raises(ValueError, match=r"config.pad_token_id = 1, ClassificationTask\(pad_token_id=\) = 0"):
        ClassificationTask(pad_token_id=0).for_model(model)
    with pytest.raises(ValueError, match=r"config.pad_token_id = 1, the tokenizer's pad_token_id = 5"):
        ClassificationTask(tokenizer=tokenizer).for_model(model)
    items = _token_items(12, seed=1)
    with pytest.raises(ValueError, match="pad token ids disagree"):
        og.unlearn(model, items[:4], items[4:], task=ClassificationTask(pad_token_id=0), verbose=False)


# --- stop rules fit the task ---------------------------------------------------------------------------------------


def test_a_stop_rule_for_another_metric_is_refused_before_any_step_naming_the_rules_that_fit(digits, digits_model):
    forget, retain = _class_split(digits[0])
    with pytest.raises(ValueError, match=r"stop='speaker' reads 'wer'.*produces 'accuracy'.*fit: 'random', 'class'"):
        og.unlearn(digits_model, forget, retain, stop="speaker", verbose=False)
    with pytest.raises(ValueError, match=r"reads 'wer'.*rules that fit: 'random', 'class'"):
        og.unlearn(digits_model, forget, retain, stop=wer_target_rule(), verbose=False)


def test_a_registered_rule_is_selected_by_name_and_checked_against_the_task(digits, digits_model, monkeypatch):
    monkeypatch.setitem(_RULES, "half", None)  # restored after the test, whatever register_stop_rule does
    register_stop_rule(StopRuleSpec(
        "half", ("accuracy",), "falls",
        lambda original: ForgetMetricRule(lambda f: f < 50.0, "forget < 50", metrics=("accuracy",)), "forget < 50",
    ))
    forget, retain = _class_split(digits[0])
    result = og.unlearn(digits_model, forget, retain, stop="half", schedule="fixed", alpha=0.5, lr=1e-3,
                        optimizer="adam", forget_batch_size=32, verbose=False)
    assert result.stop_reason == "target_reached" and result.final["forget"] < 50.0 <= result.history[-2]["forget"]
    with pytest.raises(ValueError, match="stop='half' reads 'accuracy'"):
        og.unlearn(digits_model, forget, retain, stop="half", task=og.tasks.CausalLMTask(), verbose=False)


# --- retain damage -------------------------------------------------------------------------------------------------


def test_damage_check_compares_retain_and_the_held_out_slice_with_their_tolerances():
    check = DamageCheck(original_retain=98.0, metric="accuracy", higher_is_better=True, tolerance=10.0)
    assert check.of({"retain": 89.0}, None) is None
    damage = check.of({"retain": 60.0}, None)
    assert (damage.set, damage.before, damage.after, damage.tolerance) == ("retain", 98.0, 60.0, 10.0)
    assert check.of({"retain": 95.0}, HoldoutReading(before=100.0, now=88.0, noise=15.0)) is None  # within noise
    slice_damage = check.of({"retain": 95.0}, HoldoutReading(before=100.0, now=70.0, noise=15.0))
    assert slice_damage.set == HOLDOUT_SET and slice_damage.tolerance == 15.0
    wer = DamageCheck(original_retain=10.0, metric="wer", higher_is_better=False, tolerance=10.0)
    assert wer.of({"retain": 5.0}, None) is None and wer.of({"retain": 25.0}, None).after == 25.0


def test_a_huge_lr_with_the_class_rule_is_flagged_as_damage_not_success(digits, digits_model):
    train, test = digits
    forget, retain = _class_split(train)
    with pytest.warns(RetainDamageWarning, match=r"retain damage: .*fell from .*try: lower lr"):
        result = og.unlearn(digits_model, forget, retain, test=test, stop="class", lr=1e3, verbose=False)
    assert result.damaged and result.damage.after < result.damage.before - 30.0  # far past the 10-point tolerance
    assert og.accuracy(result.model, retain) == pytest.approx(result.final["retain"])  # the returned model's figure
    with warnings.catch_warnings():
        warnings.simplefilter("error", RetainDamageWarning)
        tolerant = og.unlearn(digits_model, forget, retain, test=test, stop="class", lr=1e3,
                              damage_tolerance=100.0, verbose=False)
    assert not tolerant.damaged and tolerant.damage is None


def test_the_adaptive_schedule_given_a_large_lr_never_ends_as_plain_success(digits, digits_model):
    train, test = digits
    forget, retain = _class_split(train)
    with pytest.warns(RetainDamageWarning):
        result = og.unlearn(digits_model, forget, retain, test=test, stop="class", lr=0.2, verbose=False)
    assert result.damaged or result.stop_reason == "retain_damage"
    if not result.damaged:  # the best state within tolerance came back: its retain figure is the model's
        retain_now = og.accuracy(result.model, retain)
        assert retain_now == pytest.approx(result.final["retain"])
        assert retain_now >= result.original["retain"] - 10.0
        assert result.final["restored_from_step"] < result.steps and result.missed_target


def test_stop_none_with_a_huge_lr_is_flagged(digits, digits_model):
    train, _ = digits
    split = random_forgetting_split(labels_of(train), forget_size=100, retain_size=200, seed=0)
    forget, retain = split.datasets(train)
    with pytest.warns(RetainDamageWarning, match="lower lr"):
        result = og.unlearn(digits_model, forget, retain, lr=1e3, schedule="fixed", max_epochs=2, verbose=False)
    assert result.damaged and result.damage.set == "retain" and result.damage.after < 60.0
    assert result.inferred_stop is None


class _NaNAfter(nn.Module):
    """Wraps a model; after ``arm`` is set, forwards under autograd give NaN logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.armed = inner, False

    def forward(self, x):
        out = self.inner(x)
        return out * float("nan") if self.armed and torch.is_grad_enabled() else out


def test_after_a_non_finite_step_the_last_state_within_tolerance_comes_back(digits, digits_model):
    train, test = digits
    forget, retain = _class_split(train)
    model = _NaNAfter(copy.deepcopy(digits_model))

    def arm_after_first_row(row):
        model.armed = row["epoch"] >= 1  # epoch 1 (damaged by lr=1e3) is evaluated, then the next step is NaN

    result = og.unlearn(model, forget, retain, test=test, stop=lambda row: False, lr=1e3, schedule="fixed",
                        lora=None, max_epochs=3, on_eval=arm_after_first_row, verbose=False)
    assert result.stop_reason == "non_finite"
    assert result.history[1]["retain"] < result.original["retain"] - 10.0  # the finite state it passed was damaged
    assert result.final["restored_from_step"] == 0 and not result.damaged
    for a, b in zip(result.model.inner.parameters(), digits_model.parameters(), strict=True):
        assert torch.equal(a, b)  # the input state: the last one within tolerance


# --- stop rule inferred, budgets -----------------------------------------------------------------------------------


def test_without_stop_the_class_rule_is_inferred_for_class_forgetting_and_said(digits, digits_model, capsys):
    train, test = digits
    forget, retain = _class_split(train)
    result = og.unlearn(digits_model, forget, retain, test=test)
    assert result.inferred_stop == "class" and result.stop_reason == "target_reached"
    assert result.final["forget"] < 1.0 and result.epochs < 30
    assert "stop 'class' (inferred: the forget set's classes (3) are absent" in capsys.readouterr().err


def test_without_stop_the_random_rule_is_inferred_when_a_test_set_is_given(digits, digits_model):
    train, test = digits
    split = random_forgetting_split(labels_of(train), forget_size=130, retain_size=200, seed=1)
    forget, retain = split.datasets(train)
    result = og.unlearn(digits_model, forget, retain, test=test, verbose=False)
    assert result.inferred_stop == "random" and result.stop_reason == "target_reached"
    assert result.final["forget"] <= result.original["test"] + 0.5


def test_without_a_rule_to_infer_the_run_warns_where_forgetting_stalled(digits, digits_model):
    train, _ = digits
    split = random_forgetting_split(labels_of(train), forget_size=64, retain_size=200, seed=1)
    forget, retain = split.datasets(train)
    with pytest.warns(UserWarning, match=r"none could be inferred.*(stopped moving at step \d+|still moving)"):
        result = og.unlearn(digits_model, forget, retain, max_epochs=4, verbose=False)
    assert result.inferred_stop is None and result.stop_reason == "max_epochs"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        never = og.unlearn(digits_model, forget, retain, stop="never", max_epochs=1, lr=1e-5, verbose=False)
    assert never.inferred_stop is None and never.epochs == 1


def test_stalled_at_is_the_first_row_the_forget_metric_stayed_near_its_end():
    rows = [{"step": s, "forget": f} for s, f in [(0, 90.0), (5, 60.0), (10, 20.0), (15, 20.3), (20, 19.9)]]
    assert stalled_at(rows)["step"] == 10
    assert stalled_at(rows[:3])["step"] == 10  # still moving at the end: the last row


def test_max_steps_is_a_budget_in_steps_that_does_not_shrink_with_a_small_forget_set(digits, digits_model):
    train, _ = digits
    forget, retain = _class_split(train)
    small = torch.utils.data.Subset(forget, range(8))  # one batch of 32: one step per epoch
    result = og.unlearn(digits_model, small, retain, stop="never", max_steps=40, lr=1e-5, forget_batch_size=32,
                        verbose=False)
    assert result.stop_reason == "max_steps" and result.steps == 40 and result.final["step"] == 40
    assert result.epochs >= 39  # not capped by the default 30 epochs
    both = og.unlearn(digits_model, forget, retain, stop="never", max_steps=3, max_epochs=5, lr=1e-5, verbose=False)
    assert both.stop_reason == "max_steps" and both.steps == 3
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        og.unlearn(digits_model, forget, retain, max_steps=0)


# --- PeftModel inputs ----------------------------------------------------------------------------------------------


def _blobs(n: int, *, seed: int, classes=(0, 1, 2)) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    centres = torch.eye(3, 6) * 4.0
    return TensorDataset(centres[labels] + torch.randn(n, 6, generator=g), labels)


def _peft_mlp():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    train = _blobs(300, seed=0)
    og.train_classifier(base, train, epochs=20, device="cpu")
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))


def test_a_peft_model_has_its_own_adapters_trained_and_comes_back_as_a_peft_model():
    from peft import PeftModel

    model = _peft_mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forget, retain = _blobs(40, seed=1, classes=(2,)), _blobs(120, seed=2, classes=(0, 1))
    result = og.unlearn(model, forget, retain, max_epochs=3, schedule="fixed", alpha=0.2, lr=1e-2,
                        optimizer="adam", verbose=False)
    assert isinstance(result.model, PeftModel)
    after = dict(result.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)  # only the adapters moved
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the input is untouched
    merged = og.unlearn(model, forget, retain, max_epochs=1, verbose=False, merge=True)
    assert isinstance(merged.model, nn.Sequential) and not any("lora" in n for n, _ in merged.model.named_parameters())


def test_what_a_peft_model_cannot_do_is_refused_before_any_step():
    from peft import IA3Config, get_peft_model

    model = _peft_mlp()
    forget, retain = _blobs(20, seed=1, classes=(2,)), _blobs(60, seed=2, classes=(0, 1))
    with pytest.raises(ValueError, match="one shot, not adapters"):
        og.unlearn(model, forget, retain, method="fisher", verbose=False)
    with pytest.raises(ValueError, match="lora= settings do not apply"):
        og.unlearn(model, forget, retain, lora=og.LoRAConfig(r=2), verbose=False)
    ia3 = get_peft_model(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)),
                         IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    with pytest.raises(ValueError, match="only LoRA adapters"):
        og.unlearn(ia3, forget, retain, verbose=False)


# --- labels, devices, models, optimizer options --------------------------------------------------------------------


def test_label_formats_devices_meta_models_and_ignored_optimizer_options_get_one_line_errors(digits, digits_model):
    forget, retain = _class_split(digits[0])
    x, y = forget.dataset.tensors[0][forget.indices], forget.dataset.tensors[1][forget.indices]
    one_hot = TensorDataset(x, torch.nn.functional.one_hot(y, 10))
    with pytest.raises(ValueError, match=r"integer class ids; the forget set has one-hot .*argmax\(-1\)"):
        og.unlearn(digits_model, one_hot, retain, verbose=False)
    wrapped = [(x[i], [int(y[i])]) for i in range(len(y))]
    with pytest.raises(ValueError, match="labels must be integer class ids; the forget set has lists of one id"):
        og.unlearn(digits_model, wrapped, retain, verbose=False)
    floats = TensorDataset(x, y.float())
    with pytest.raises(ValueError, match=r"floating-point labels .*\.long\(\)"):
        og.unlearn(digits_model, floats, retain, verbose=False)
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="device 'mps' was requested but mps is not available here"):
            og.unlearn(digits_model, forget, retain, device="mps", verbose=False)
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        og.unlearn(digits_model, forget, retain, device="gpu0", verbose=False)
    meta = nn.Linear(64, 10, device="meta")
    with pytest.raises(ValueError, match="tensors on the meta device"):
        og.unlearn(meta, forget, retain, verbose=False)
    with pytest.raises(ValueError, match="momentum=0.9 applies to optimizer='sgd' only; 'adam' would ignore it"):
        og.unlearn(digits_model, forget, retain, momentum=0.9, optimizer="adam", verbose=False)
    with pytest.raises(ValueError, match="'adam' would ignore it"):
        og.unlearn(digits_model, forget, retain, method="scrub", momentum=0.5, verbose=False)
    assert og.methods.make_config("scrub", {}).momentum == 0.9  # its default (unused by Adam) is not refused
