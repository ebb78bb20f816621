"""benchmarks/step_cost.py: every full (GPU) shape can be built and stepped, on the ghost engine, before a GPU run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"


@pytest.fixture(scope="module")
def step_cost():
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_setup_lists_cover_every_model_kind(step_cost):
    full = [s.name for s in step_cost.full_setups()]
    assert len(set(full)) == len(full)
    for kind in ("resnet18_32_full", "resnet18_224_lora", "vit_b16_224_lora_attn", "whisper_tiny", "gpt2"):
        assert any(name.startswith(kind) for name in full), kind
    assert any(s.task == "causal_lm" for s in step_cost.quick_setups())


def test_dry_run_steps_small_full_shapes_in_both_precisions(step_cost, capsys):
    step_cost.main(["--gpu-full", "--dry-run", "--device", "cpu", "--setups", "resnet18_32_lora", "resnet18_32_full"])
    out = capsys.readouterr().out
    assert out.count("| resnet18_32_lora | ghost (ghost) |") == 2 and "bf16=True" in out and "bf16=False" in out
    assert out.count("one step each: ok") == 4


def test_incompatible_lists_are_refused(step_cost):
    with pytest.raises(SystemExit):
        step_cost.main(["--quick", "--gpu-full"])
    with pytest.raises(SystemExit):
        step_cost.main(["--gpu-full", "--dry-run", "--setups", "nope"])


@pytest.mark.slow
def test_every_full_shape_builds_and_runs_on_the_ghost_engine(step_cost):
    """The paper's shapes (ViT-B/16 with LoRA on nn.MultiheadAttention included) never fall off the ghost engine."""
    rows = step_cost.dry_run(step_cost.full_setups(), ["ghost"], device=torch.device("cpu"), bf16=False)
    assert [row["used"] for row in rows] == ["ghost"] * len(step_cost.full_setups())


def test_step_phases_clock_charges_nested_time_to_the_inner_phase_only(monkeypatch):
    """benchmarks/step_phases.py: a phase's time excludes its nested phases', and a helper shared by two phases
    stays with the calling phase it is told to (``except_within``)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_phases.py"
    spec = importlib.util.spec_from_file_location("step_phases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ticks = iter([0.0, 1.0, 3.0, 4.0, 4.5, 10.0])
    monkeypatch.setattr(module.time, "thread_time", lambda: next(ticks))
    clock = module.PhaseClock()

    class Owner:
        @staticmethod
        def helper() -> None:
            pass

    clock.wrap(Owner, "helper", "probe sum", except_within=("combine",))
    with clock.phase("combine"):  # 0 .. 10
        with clock.phase("gram"):  # 1 .. 3
            pass
        Owner.helper()  # 4 .. 4.5, charged to "combine"
    assert clock.totals == {"gram": 2.0, "combine": 8.0}
