"""The iterative baselines (FT, NegGrad, NegGrad+, SCRUB, GDR-GMA) against direct computations on tiny problems,
and end to end on digits class forgetting."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import orthograd as og
from orthograd.data import class_forgetting_split, load_digits_dataset
from orthograd.data.splits import labels_of
from orthograd.methods import MethodContext, make_config
from orthograd.methods._common import decayed_lr, distill_kl
from orthograd.methods.gdr_gma import GradientBank, gma_weight, rectify
from orthograd.models import SmallCNN
from orthograd.tasks import ClassificationTask
from orthograd.tasks.base import IGNORE_INDEX

BASELINES = ("finetune", "neggrad", "neggrad+", "scrub", "gdr-gma")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def _method(name: str, model: nn.Module, forget: TensorDataset, retain: TensorDataset, **hyper):
    """A method on all parameters of ``model`` (lora=None), built as the runner builds it."""
    config = make_config(name, {"lora": None, **hyper})
    context = MethodContext(
        model=model,
        task=ClassificationTask(),
        forget=forget,
        retain=retain,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    return og.methods.get(name)(config, context)


def _grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def _full_batch_loss(model: nn.Module, data: TensorDataset) -> torch.Tensor:
    inputs, labels = data.tensors
    return F.cross_entropy(model(inputs), labels)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", BASELINES)
def test_config_round_trip_and_registry(name: str) -> None:
    assert name in og.methods.available()
    config = make_config(name, {"lr": 0.123})
    again = make_config(name, config.to_dict())
    assert again == config and again.lr == 0.123
    assert type(again).__doc__ and "DEVIATION" in type(again).__doc__


@pytest.mark.parametrize("name", BASELINES)
def test_unknown_hyperparameter_is_rejected(name: str) -> None:
    with pytest.raises(ValueError, match=r"unknown hyperparameter.*'learning_rate'.*valid"):
        make_config(name, {"learning_rate": 0.1})


def test_defaults_are_the_source_code_defaults() -> None:
    ft, ga = make_config("finetune"), make_config("neggrad")
    assert (ft.lr, ft.momentum, ft.weight_decay, ft.retain_batch_size, ft.lr_decay_epochs) == (
        0.01, 0.9, 5e-4, 256, (91, 136)
    )
    assert (ga.lr, ga.momentum, ga.weight_decay, ga.forget_batch_size, ga.max_grad_norm) == (1e-4, 0.9, 5e-4, 256, None)
    ngp = make_config("neggrad+")
    assert (ngp.beta, ngp.lr, ngp.momentum, ngp.retain_batch_size, ngp.forget_batch_size) == (0.95, 0.01, 0.0, 128, 64)
    sc = make_config("scrub")
    assert (sc.optimizer, sc.lr, sc.weight_decay, sc.temperature, sc.alpha, sc.gamma, sc.msteps) == (
        "adam", 5e-4, 0.1, 2.0, 0.5, 1.0, 3
    )
    assert (sc.lr_decay_epochs, sc.retain_batch_size, sc.forget_batch_size) == ((5, 8, 9), 32, 64)
    gg = make_config("gdr-gma")
    assert (gg.optimizer, gg.lr, gg.weight_decay, gg.gamma, gg.eps, gg.forget_batch_size) == (
        "adamw", 1e-4, 0.01, 100.0, 0.02, 256
    )
    assert (gg.rectify, gg.bank_scope, gg.bank_mean) == ("code_sequential", "last_tensor", "clean")


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("neggrad+", {"beta": 1.0}, "beta must be in"),
        ("neggrad+", {"prox_wd": -1.0}, "prox_wd"),
        ("neggrad", {"max_grad_norm": 0.0}, "max_grad_norm"),
        ("finetune", {"lr_decay_epochs": [0]}, "lr_decay_epochs"),
        ("scrub", {"msteps": -1}, "msteps"),
        ("scrub", {"temperature": 0.0}, "temperature"),
        ("gdr-gma", {"rectify": "pcgrad"}, "rectify must be one of"),
        ("gdr-gma", {"bank_scope": "first"}, "bank_scope"),
        ("gdr-gma", {"bank_mean": "median"}, "bank_mean"),
    ],
)
def test_invalid_settings_are_rejected(name: str, values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_config(name, values)


def test_step_decay_matches_multisteplr_and_scrub_schedule() -> None:
    ft = make_config("finetune")
    assert [decayed_lr(ft, e) for e in (1, 91, 92, 136, 137)] == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4])
    sc = make_config("scrub")  # adjust_learning_rate: lr * 0.1 ** #{m in (5, 8, 9): epoch > m}
    assert [decayed_lr(sc, e) for e in (1, 5, 6, 8, 9, 10)] == pytest.approx([5e-4, 5e-4, 5e-5, 5e-5, 5e-6, 5e-7])


# ---------------------------------------------------------------- FT and NegGrad


@pytest.mark.parametrize(("name", "which", "sign"), [("finetune", "retain", 1.0), ("neggrad", "forget", -1.0)])
def test_one_step_is_a_manual_sgd_step(name: str, which: str, sign: float) -> None:
    forget, retain = _data(6, seed=1), _data(8, seed=2)
    model, reference = _mlp(), _mlp()
    method = _method(name, model, forget, retain, lr=0.05)
    stats = next(iter(method.run_epoch(1)))  # one batch holds the whole set
    data = retain if which == "retain" else forget
    loss = _full_batch_loss(reference, data)
    # first SGD step with momentum: the buffer is the gradient itself; weight decay 5e-4 is added to it
    pairs = zip(reference.parameters(), _grads(reference, loss), strict=True)
    expected = [p - 0.05 * (sign * g + 5e-4 * p) for p, g in pairs]
    for got, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert stats[f"{which}_loss"] == pytest.approx(float(loss.detach()))
    assert method.train_mode is True


def test_neggrad_clipping_bounds_the_step() -> None:
    forget, retain = _data(6, seed=1), _data(8, seed=2)
    model, reference = _mlp(), _mlp()
    method = _method("neggrad", model, forget, retain, lr=1.0, momentum=0.0, weight_decay=0.0, max_grad_norm=1e-3)
    next(iter(method.run_epoch(1)))
    with torch.no_grad():
        pairs = zip(model.parameters(), reference.parameters(), strict=True)
        moved = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in pairs))
    assert float(moved) == pytest.approx(1e-3, rel=1e-4)


# ---------------------------------------------------------------- NegGrad+


def test_neggrad_plus_loss_value_and_gradient() -> None:
    forget, retain = _data(5, seed=3), _data(7, seed=4)
    model = _mlp()
    method = _method("neggrad+", model, forget, retain, beta=0.9, prox_wd=0.2)
    initial = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    loss, stats = method.objective(retain.tensors, forget.tensors)

    retain_ce, forget_ce = _full_batch_loss(model, retain), _full_batch_loss(model, forget)
    distance = sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), initial, strict=True))
    expected = 0.9 * (retain_ce + 0.1 * distance) - 0.1 * forget_ce
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert stats["forget_loss"] == pytest.approx(float(forget_ce.detach()))

    g_r, g_f = _grads(model, retain_ce), _grads(model, forget_ce)
    terms = zip(g_r, g_f, model.parameters(), initial, strict=True)
    want = [0.9 * (gr + 0.2 * (p - p0)) - 0.1 * gf for gr, gf, p, p0 in terms]
    for got, w in zip(_grads(model, loss), want, strict=True):
        torch.testing.assert_close(got, w)


def test_neggrad_plus_eval_mode_and_task_default_prox() -> None:
    method = _method("neggrad+", _mlp(), _data(4, 1), _data(4, 2))
    assert method.train_mode is False  # [QUIRK] the source's model.eval()
    assert method.prox_wd == 0.1  # None resolves to the notebook's value for classification


def test_neggrad_plus_cycles_the_same_forget_batches_in_order() -> None:
    forget, retain = _data(6, seed=5), _data(14, seed=6)  # 3 forget batches of 2, 7 retain batches of 2
    method = _method("neggrad+", _mlp(), forget, retain, forget_batch_size=2, retain_batch_size=2)
    seen: list[torch.Tensor] = []
    objective = method.objective
    method.objective = lambda r, f: (seen.append(f[0].clone()), objective(r, f))[1]  # type: ignore[method-assign]
    assert len(list(method.run_epoch(1))) == 7  # an epoch is one pass over the retain set
    for i in range(3, 7):
        assert torch.equal(seen[i], seen[i - 3])
    assert not torch.equal(seen[0], seen[1])


# ---------------------------------------------------------------- SCRUB


def _kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The source's DistillKL: kl_div(log_softmax(s/T), softmax(t/T), sum) * T^2 / batch."""
    log_s = F.log_softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_s, p_t, reduction="sum") * temperature**2 / student.shape[0]


def test_distill_kl_is_teacher_to_student_with_temperature() -> None:
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    got = distill_kl(student, teacher, torch.zeros(6, dtype=torch.long), temperature=3.0)
    torch.testing.assert_close(got, _kl_by_hand(student, teacher, 3.0))
    reverse = distill_kl(teacher, student, torch.zeros(6, dtype=torch.long), temperature=3.0)
    assert not torch.isclose(got, reverse)


def test_distill_kl_on_sequences_averages_labelled_tokens() -> None:
    student, teacher = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    targets = torch.tensor([[1, 2, IGNORE_INDEX, IGNORE_INDEX], [3, 4, 5, IGNORE_INDEX]])
    tokens = [(b, t) for b in range(2) for t in range(4) if targets[b, t] != IGNORE_INDEX]
    kl = sum(_kl_by_hand(student[b, t][None], teacher[b, t][None], 2.0) for b, t in tokens) / len(tokens)
    torch.testing.assert_close(distill_kl(student, teacher, targets, temperature=2.0), kl)


def test_scrub_max_steps_only_in_the_first_msteps_epochs() -> None:
    forget, retain = _data(6, seed=7), _data(8, seed=8)  # 3 forget batches, 2 retain batches
    method = _method("scrub", _mlp(), forget, retain, msteps=2, forget_batch_size=2, retain_batch_size=4)
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    kinds = {epoch: [s["max_step"] for s in method.run_epoch(epoch)] for epoch in range(1, 5)}
    assert kinds[1] == kinds[2] == [1.0, 1.0, 1.0, 0.0, 0.0]  # the max pass comes first
    assert kinds[3] == kinds[4] == [0.0, 0.0]
    assert method.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)  # epochs <= 5: no decay yet
    for name, value in method.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_before[name])


def test_scrub_losses_against_the_teacher() -> None:
    forget, retain = _data(5, seed=9), _data(6, seed=10)
    model = _mlp()
    method = _method("scrub", model, forget, retain, temperature=4.0, alpha=0.3, gamma=0.7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    teacher = _mlp()  # the same initial weights: the frozen copy taken in __init__
    x_f, _ = forget.tensors
    x_r, y_r = retain.tensors
    max_loss = method.max_loss(forget.tensors)
    torch.testing.assert_close(max_loss, -_kl_by_hand(model(x_f), teacher(x_f), 4.0))
    min_loss, _ = method.min_loss(retain.tensors)
    expected = 0.7 * F.cross_entropy(model(x_r), y_r) + 0.3 * _kl_by_hand(model(x_r), teacher(x_r), 4.0)
    torch.testing.assert_close(min_loss, expected)


# ---------------------------------------------------------------- GDR-GMA


def test_rectify_sequential_quirk_and_simultaneous() -> None:
    x = torch.tensor([1.0, 0.0, 0.5])
    y = torch.tensor([-1.0, 1.0, 0.0])
    xs, ys = rectify(x, y, mode="code_sequential")
    assert float(xs @ y) == pytest.approx(0.0, abs=1e-6)
    assert float(xs @ ys) > 1e-3  # x' is orthogonal to y, not to y'
    inner = float(x @ y)
    torch.testing.assert_close(ys, y - inner / float(x @ x) * xs)
    xp, yp = rectify(x, y, mode="simultaneous")
    assert float(xp @ y) == pytest.approx(0.0, abs=1e-6) and float(yp @ x) == pytest.approx(0.0, abs=1e-6)
    same = rectify(x, -y)  # no conflict: untouched
    assert same[0] is x


def test_gma_weight_formula() -> None:
    for loss in (0.0, 0.01, 0.02, 0.05, 0.1, 3.0, 50.0):
        direct = 1.0 / (1.0 + math.exp(min(100.0 * (loss - 0.02), 700.0)))
        assert gma_weight(loss, gamma=100.0, eps=0.02) == pytest.approx(direct, rel=1e-12, abs=1e-300)
    assert gma_weight(0.02, gamma=100.0, eps=0.02) == 0.5
    assert gma_weight(1e6, gamma=100.0, eps=0.02) == 0.0  # no overflow


def test_gdr_gma_directions_are_rectified_per_tensor() -> None:
    forget, retain = _data(8, seed=11), _data(8, seed=12)
    model, reference = _mlp(seed=3), _mlp(seed=3)
    method = _method("gdr-gma", model, forget, retain)
    x, y, _ = method.directions(forget.tensors, retain.tensors, epoch=1)
    raw_x = [g.reshape(-1) for g in _grads(reference, _full_batch_loss(reference, retain))]
    raw_y = [g.reshape(-1) for g in _grads(reference, -_full_batch_loss(reference, forget))]
    conflicting = 0
    for name, rx, ry in zip(method.params, raw_x, raw_y, strict=True):
        if float(rx @ ry) < 0:
            conflicting += 1
            want_x = rx - (rx @ ry) / (ry @ ry) * ry
            want_y = ry - (rx @ ry) / (rx @ rx) * want_x
            assert float(x[name] @ ry) == pytest.approx(0.0, abs=1e-6)
        else:
            want_x, want_y = rx, ry
        torch.testing.assert_close(x[name], want_x)
        torch.testing.assert_close(y[name], want_y)
        assert float(x[name] @ y[name]) >= -1e-7  # no conflict left in any tensor
    assert conflicting >= 1


def test_gdr_gma_step_is_adamw_on_the_weighted_direction() -> None:
    forget, retain = _data(8, seed=11), _data(8, seed=12)
    model, reference = _mlp(seed=3), _mlp(seed=3)
    method = _method("gdr-gma", model, forget, retain, eps=1.0)
    x, y, stats = method.directions(forget.tensors, retain.tensors, epoch=1)
    weight = 1.0 / (1.0 + math.exp(100.0 * (stats["retain_loss"] - 1.0)))
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-4)
    for (name, p) in reference.named_parameters():
        p.grad = ((1 - weight) * x[name] + weight * y[name]).view_as(p)
    optimizer.step()
    out = next(iter(method.run_epoch(1)))
    assert out["gma_lambda"] == pytest.approx(weight)
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want)


def test_gdr_gma_eps_none_is_calibrated_to_the_first_retain_loss() -> None:
    forget, retain = _data(8, seed=11), _data(8, seed=12)
    method = _method("gdr-gma", _mlp(seed=3), forget, retain, eps=None, forget_batch_size=4, retain_batch_size=4)
    steps = list(method.run_epoch(1))
    first_loss = steps[0]["retain_loss"]
    assert steps[0]["gma_eps"] == first_loss
    assert steps[0]["gma_lambda"] == pytest.approx(0.5)  # lambda starts at 0.5 whatever the model's loss
    assert steps[1]["gma_eps"] == steps[0]["gma_eps"]  # fixed after the first step
    expected = 1.0 / (1.0 + math.exp(100.0 * (steps[1]["retain_loss"] - first_loss)))
    assert steps[1]["gma_lambda"] == pytest.approx(expected)


def test_gdr_gma_bank_last_tensor_and_temporal_rectification() -> None:
    forget, retain = _data(8, seed=11), _data(8, seed=12)
    method = _method("gdr-gma", _mlp(), forget, retain, forget_batch_size=4)
    assert list(method.banks) == [list(method.params)[-1]]
    assert method.banks[list(method.params)[-1]].entries.maxlen == 2  # ceil(8 / 4) forget steps
    all_banks = _method("gdr-gma", _mlp(), forget, retain, bank_scope="all")
    assert list(all_banks.banks) == list(all_banks.params)


def test_gradient_bank_clean_mean_and_inplace_quirk() -> None:
    direction = torch.tensor([1.0, 0.0])
    entries = [torch.tensor([-1.0, 1.0]), torch.tensor([2.0, 0.0]), torch.tensor([-3.0, -1.0])]
    clean = GradientBank(5, inplace_mean=False)
    quirky = GradientBank(5, inplace_mean=True)
    for e in entries:
        clean.add(e)
        quirky.add(e)
    torch.testing.assert_close(clean.mean_conflicting(direction), torch.tensor([-2.0, 0.0]))
    torch.testing.assert_close(clean.entries[0], entries[0])  # the clean mean leaves the bank alone
    torch.testing.assert_close(quirky.mean_conflicting(direction), torch.tensor([-2.0, 0.0]))
    torch.testing.assert_close(quirky.entries[0], torch.tensor([-4.0, 0.0]))  # the source's in-place sum
    assert clean.mean_conflicting(-direction) is not None and clean.mean_conflicting(torch.tensor([0.0, 0.0])) is None


# ---------------------------------------------------------------- end to end on digits

SOURCE_EPOCHS = {"finetune": 10, "neggrad": 5, "neggrad+": 10, "scrub": 10, "gdr-gma": 10}
# Tuned on this problem. SCRUB's max steps have zero gradient while the student equals the teacher, and its source
# schedule (3 max-step epochs, lr decayed 10x after epochs 5, 8, 9) leaves it at the edge: with lr 3e-3 it stalled at
# A_u = 100% on some model x run seeds and thread counts. Max steps in every epoch (msteps=30, inside A.2's
# {10, 20, 30} grid) at a constant lr 5e-3 reached the target within 4 of 30 epochs, test accuracy >= 74.9%, on all
# 12 model seed (0-3) x run seed (0-2) combinations tried, with 1 and 2 torch threads.
DIGITS_HYPER = {
    "neggrad": {"lr": 3e-3},
    "neggrad+": {"lr": 0.1},
    "scrub": {"lr": 5e-3, "msteps": 30, "lr_decay_epochs": ()},
    "gdr-gma": {"lr": 1e-3},
}


@pytest.fixture(scope="module")
def digits_problem():
    torch.manual_seed(0)
    train, test = load_digits_dataset()
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(15):
        for x, y in DataLoader(train, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    split = class_forgetting_split(labels_of(train), forget_class=3, retain_size=200, seed=0)
    forget, retain = split.datasets(train)
    return model, forget, retain, test


@pytest.mark.parametrize("name", BASELINES)
def test_code_defaults_do_not_forget_a_digits_class_in_the_source_budget(name: str, digits_problem) -> None:
    """A result, not a bug: the code defaults were set for CIFAR-sized sets (thousands of forget samples, tens of
    steps per epoch); on 137 forget digits an epoch is one or a few steps and, within the source's epoch count,
    no baseline moves forget accuracy below 90% (nor hurts retain accuracy)."""
    model, forget, retain, test = digits_problem
    result = og.unlearn(model, forget, retain, test=test, method=name, stop="class", max_epochs=SOURCE_EPOCHS[name])
    assert result.stop_reason == "max_epochs" and result.epochs == SOURCE_EPOCHS[name]
    assert result.original["forget"] == 100.0
    assert result.final["forget"] > 90.0 and result.final["retain"] > 90.0
    moved = max(float((a - b).abs().max()) for a, b in zip(result.model.parameters(), model.parameters(), strict=True))
    assert moved > 1e-5  # it trained (a method that does nothing would pass the lines above)


@pytest.mark.parametrize("name", sorted(DIGITS_HYPER))
def test_forgets_a_digits_class_with_tuned_hyperparameters(name: str, digits_problem) -> None:
    model, forget, retain, test = digits_problem
    result = og.unlearn(
        model, forget, retain, test=test, method=name, stop="class", max_epochs=30, **DIGITS_HYPER[name]
    )
    assert result.stop_reason == "target_reached" and result.final["forget"] < 1.0
    assert result.final["test"] > (50.0 if name != "neggrad" else 30.0)
    assert type(result.model) is SmallCNN  # LoRA (the default, as for OrthoGrad) merged back


def test_finetune_does_not_forget_even_with_a_larger_learning_rate(digits_problem) -> None:
    """FT is the catastrophic-forgetting reference: ten times its default lr over 30 epochs leaves the class known."""
    model, forget, retain, test = digits_problem
    result = og.unlearn(model, forget, retain, test=test, method="finetune", stop="class", max_epochs=30, lr=0.1)
    assert result.stop_reason == "max_epochs" and result.final["forget"] > 90.0


def test_config_object_is_accepted_by_unlearn(digits_problem) -> None:
    model, forget, retain, _ = digits_problem
    config = dataclasses.replace(make_config("scrub"), lr=3e-3, msteps=1)
    result = og.unlearn(model, forget, retain, method="scrub", config=config, max_epochs=2)
    assert result.config["msteps"] == 1 and result.epochs == 2
    max_fraction = [row["max_step"] for row in result.history[1:]]
    assert max_fraction[0] > 0.0 and max_fraction[1] == 0.0
