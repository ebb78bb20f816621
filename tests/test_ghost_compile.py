"""OrthoGrad's ``compile`` option: the compiled ghost math gives the eager update, partial batches and short runs
stay eager, a missing compiler is refused with the fix, and the setting stays out of the job keys at its default."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.data import TensorDataset

import orthograd as og
from orthograd.methods import MethodContext, make_config
from orthograd.methods.orthograd.gradients import COMPILE_MIN_STEPS
from orthograd.models import SmallCNN
from orthograd.tasks import ClassificationTask

RETAIN, FORGET = 6, 4


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _method(**hyper):
    torch.manual_seed(0)
    config = make_config("orthograd", {"lora": None, "schedule": "fixed", "alpha": 0.3, **hyper})
    context = MethodContext(
        model=SmallCNN(width=4).eval(), task=ClassificationTask(), forget=_data(FORGET, 1), retain=_data(RETAIN, 2),
        device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
    )
    return og.methods.get("orthograd")(config, context)


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params.values()]).double()


@pytest.mark.slow  # compiling three graphs: ~20 s on 2 busy cores with inductor's cache warm, more when cold
def test_compiled_ghost_steps_give_the_eager_updates_and_a_partial_batch_runs_eagerly():
    """Conv, GroupNorm and Linear pieces (ghost and materialised Gram blocks, joined dense pieces): three steps of
    compile=True and compile=False from the same state, one pass for both batches; the third step's smaller forget
    batch is not the compiled shape and runs eagerly."""
    forget, retain = _data(FORGET, 1).tensors, _data(RETAIN, 2).tensors
    eager, compiled = _method(compile=False, fuse_passes=True), _method(compile=True, fuse_passes=True)
    assert torch.equal(_flat(eager.params), _flat(compiled.params))
    graphs = counters["stats"]["unique_graphs"]
    for forget_rows in (FORGET, FORGET, FORGET - 1):
        batch = tuple(t[:forget_rows] for t in forget)
        expect_compiled = forget_rows == FORGET
        assert compiled.gradients.compiling(batch, retain) == expect_compiled
        assert not eager.gradients.compiling(batch, retain)
        stats = [method.step(batch, retain) for method in (eager, compiled)]
        # float64 Gram sums and float32 weighted sums in another order: round-off only
        moved = _flat(eager.params) - _flat(compiled.params)
        assert float(moved.norm()) <= 1e-6 * float(_flat(eager.params).norm())
        for key in ("forget_loss", "retain_loss", "kept_fraction"):
            assert stats[1][key] == pytest.approx(stats[0][key], rel=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs >= 3  # the Gram blocks, the forget sum, G^T w


def test_auto_compiles_only_for_a_run_long_enough_to_earn_the_compile_time_back():
    method = _method()
    assert method.config.compile == "auto"
    forget, retain = _data(FORGET, 1).tensors, _data(RETAIN, 2).tensors
    assert not method.gradients.compiling(forget, retain)  # no budget told
    method.plan(target=None, max_epochs=2)
    assert method.gradients.step_budget == 2  # 4 forget samples: one batch an epoch
    assert not method.gradients.compiling(forget, retain)
    method.plan(target=None, max_epochs=None, max_steps=COMPILE_MIN_STEPS)
    assert method.gradients.compiling(forget, retain)


def test_compile_without_a_working_compiler_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("no-such-c++-compiler",))
    with pytest.raises(ValueError, match="compile=True: inductor needs a C\\+\\+ compiler.*pass compile=False"):
        _method(compile=True)
    method = _method()  # "auto" runs eagerly instead, even for a long run
    method.plan(target=None, max_epochs=None, max_steps=COMPILE_MIN_STEPS)
    assert not method.gradients.compiling(_data(FORGET, 1).tensors, _data(RETAIN, 2).tensors)


def test_compile_stays_out_of_the_config_dict_at_its_default():
    config = make_config("orthograd", {})
    assert "compile" not in config.to_dict()
    assert make_config("orthograd", config.to_dict()) == config
    chosen = make_config("orthograd", {"compile": True})
    assert chosen.to_dict()["compile"] is True
    assert make_config("orthograd", chosen.to_dict()) == chosen
    with pytest.raises(ValueError, match="compile"):
        make_config("orthograd", {"compile": "sometimes"})
