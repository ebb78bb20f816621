"""Tuning-free OrthoGrad on language models: the controller's pace rule, the small-forget-set batch, the causal-LM
LoRA defaults, and the toy of issue 24 (a tiny Llama that memorised 60 QA pairs forgets 5 with no hyperparameter)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from hf_helpers import QADataset, tiny_gpt2, tiny_llama
from torch.utils.data import DataLoader

import orthograd as og
from orthograd.lora import LoRAConfig, attach_lora, default_lora_targets
from orthograd.methods import make_config
from orthograd.methods.oneshot import OneShotConfig, scoped_parameters
from orthograd.methods.orthograd.controller import ControllerRule, ProgressMeter, on_pace
from orthograd.methods.orthograd.method import forget_batch_size
from orthograd.stopping import class_forgetting_rule, random_forgetting_rule, wer_target_rule

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_toy_forgetting.py"


def test_on_pace_extrapolates_the_last_checks_rate_to_the_steps_left():
    # 80 -> 78 in 2 steps: 1 point a step; 28 points to go toward 50
    assert on_pace(before=80.0, now=78.0, target=50.0, steps=2, steps_left=28)
    assert not on_pace(before=80.0, now=78.0, target=50.0, steps=2, steps_left=27)
    assert not on_pace(before=78.0, now=80.0, target=50.0, steps=1, steps_left=1000)  # moving away
    assert on_pace(before=10.0, now=40.0, target=75.0, steps=3, steps_left=4)  # a rising target (WER)
    assert on_pace(before=60.0, now=50.0, target=50.0, steps=1, steps_left=0)


def test_a_slowly_falling_metric_never_stalls_but_is_not_on_pace_and_the_controller_raises():
    """A language model's answer probability falls a little at every check: the old stall test holds forever."""
    falling = [99.0 - 0.5 * i for i in range(12)]
    stall_meter = ProgressMeter(higher_is_better=True)
    assert all(stall_meter.progressed(forget_metric=m, forget_loss=1.0) for m in falling)
    meter, pressure = ProgressMeter(higher_is_better=True, target=2.0), ControllerRule(share=0.5, lr=1e-3, patience=4)
    actions = [
        pressure.update(progressed=meter.progressed(forget_metric=m, forget_loss=1.0, steps=1, steps_left=60 - i),
                        retain_degraded=False)
        for i, m in enumerate(falling)
    ]
    assert actions[:4] == ["hold"] * 4 and actions[4] == "raise" and actions.count("raise") == 2
    assert pressure.share == pytest.approx(0.875)
    fast = ProgressMeter(higher_is_better=True, target=2.0)
    assert all(fast.progressed(forget_metric=99.0 - 10 * i, forget_loss=1.0, steps=1, steps_left=60) for i in range(9))


def test_back_off_on_damage_still_wins_over_a_slow_pace():
    pressure = ControllerRule(share=0.5, lr=1e-3, patience=1)
    assert pressure.update(progressed=False, retain_degraded=True) == "back_off" and pressure.share == 0.25


def test_built_in_stop_rules_name_their_target():
    assert random_forgetting_rule(original_test=3.0).target == pytest.approx(3.5)
    assert class_forgetting_rule().target == 1.0 and wer_target_rule().target == 75.0


def test_small_forget_sets_get_a_smaller_default_batch_so_an_epoch_has_four_steps():
    adaptive = make_config("orthograd", {})
    assert forget_batch_size(adaptive, QADataset(5, seed=0)) == 2  # 3 steps an epoch instead of 1
    assert forget_batch_size(adaptive, QADataset(20, seed=0)) == 5
    assert forget_batch_size(adaptive, QADataset(500, seed=0)) == 32
    assert forget_batch_size(make_config("orthograd", {"forget_batch_size": 32}), QADataset(5, seed=0)) == 32
    assert forget_batch_size(make_config("orthograd-fixed", {}), QADataset(5, seed=0)) == 128


def test_causal_lm_default_lora_targets_add_the_mlp_projections_of_every_block():
    llama = default_lora_targets(tiny_llama(), mlp=True)
    leaves = {name.rsplit(".", 1)[-1] for name in llama}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(llama) == 14 and "lm_head" not in llama
    assert {name.rsplit(".", 1)[-1] for name in default_lora_targets(tiny_llama())} == {
        "q_proj", "k_proj", "v_proj", "o_proj"}  # other tasks keep the paper's attention-only default
    gpt2 = default_lora_targets(tiny_gpt2(), mlp=True)
    assert sorted(gpt2) == sorted(f"transformer.h.{i}.{m}" for i in range(2)
                                  for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    adapted = attach_lora(tiny_gpt2(), LoRAConfig(r=2), seed=0, mlp=True)
    assert any("mlp.c_fc.lora_A" in n for n, p in adapted.named_parameters() if p.requires_grad)
    edited = scoped_parameters(tiny_llama(), OneShotConfig(), mlp=True)  # Fisher/Influence edit the same layers
    assert "model.layers.1.mlp.down_proj.weight" in edited and not any("lm_head" in n for n in edited)


@pytest.fixture(scope="module")
def toy_script():
    spec = importlib.util.spec_from_file_location("llm_toy_forgetting", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_the_default_forgets_five_memorised_pairs_down_to_never_seen_answers(toy_script):
    toy = toy_script.build_toy(forget=5, seed=0, train_steps=150)
    result, actions = toy_script.run(toy)
    assert result.original["forget"] > 99.0 and result.original["test"] < 1.0  # memorised vs never seen
    assert result.stop_reason == "target_reached"  # before the pace rule and the MLP adapters: 80% after 30 steps
    assert result.final["forget"] <= result.original["test"] + 0.5
    assert result.final["retain"] > 95.0  # measured 99.2
    assert actions["raise"] >= 1 and result.steps < 90  # measured 47 steps of a 90-step budget
    assert result.config["lora"]["targets"] is None  # the defaults, nothing tuned


def test_toy_data_labels_only_the_answers(toy_script):
    pairs = toy_script.qa_pairs(3, generator=torch.Generator().manual_seed(0))
    batch = next(iter(DataLoader(pairs, batch_size=3)))
    cut = toy_script.QUESTION_TOKENS
    assert (batch["labels"][:, :cut] == -100).all()
    assert torch.equal(batch["labels"][:, cut:], batch["input_ids"][:, cut:])


def test_the_runner_tells_the_adaptive_schedule_its_target_and_step_budget():
    built = []

    def keep(cls, config, context):
        built.append(cls(config, context))
        return built[-1]

    result = og.unlearn(tiny_llama(), QADataset(6, seed=1), QADataset(12, seed=2), test=QADataset(6, seed=3),
                        task="causal_lm", stop="random", max_epochs=2, device="cpu", make_method=keep)
    controller = built[0].controller
    assert built[0].forget_batch_size == 2 and controller.budget == 2 * 3  # ceil(6 / 4) = 2: 3 steps an epoch
    assert controller.meter.target == pytest.approx(result.original["test"] + 0.5)
    assert sum(built[0].controller_actions.values()) == result.steps  # a check after every step
