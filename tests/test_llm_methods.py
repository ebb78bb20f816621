"""GradDiff, SimNPO and RMU (OpenUnlearning's language-model baselines): each loss against a hand computation on
tiny numbers, their validation, and runs through ``unlearn`` on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
from hf_helpers import LLAMA_LORA, QADataset, tiny_llama
from torch import nn
from torch.utils.data import DataLoader

import orthograd as og
from orthograd.methods import get, make_config
from orthograd.methods.base import MethodContext
from orthograd.methods.graddiff import ForgetRetainConfig
from orthograd.methods.rmu import RMUConfig, activation_loss, layer_output, steering_vector
from orthograd.methods.simnpo import SimNPOConfig, simnpo_loss
from orthograd.tasks import get_task

CPU = torch.device("cpu")
VOCAB = 4


class Bigram(nn.Module):
    """Logits at position t are a row of a table picked by token t; hidden states are the table rows and twice
    them, so every number below can be computed by hand."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table))

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        rows = self.table[input_ids]
        return {"logits": rows, "hidden_states": (rows, rows * 2.0, rows * 3.0) if output_hidden_states else None}


TABLE = [[0.5, -1.0, 2.0, 0.0], [1.0, 0.0, -0.5, 0.3], [0.0, 0.2, 0.1, -2.0], [-1.0, 1.5, 0.0, 0.7]]
# two sequences: prompt token(s) unlabelled, answers of 2 and 1 tokens; the second is padded by one position
BATCH = {
    "input_ids": torch.tensor([[1, 2, 3, 0], [3, 1, 0, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    "labels": torch.tensor([[-100, 2, 3, 0], [-100, -100, 0, -100]]),
}


def log_softmax(row: list[float], index: int) -> float:
    return row[index] - math.log(sum(math.exp(v) for v in row))


def token_nlls(table: list[list[float]]) -> list[list[float]]:
    """Per sequence, -log p of each labelled token given the previous token (by hand from the table)."""
    out = []
    for ids, labels in zip(BATCH["input_ids"].tolist(), BATCH["labels"].tolist(), strict=True):
        out.append([-log_softmax(table[ids[t]], labels[t + 1]) for t in range(len(ids) - 1) if labels[t + 1] != -100])
    return out


def context_for(model: nn.Module) -> MethodContext:
    data = [{key: value[i] for key, value in BATCH.items()} for i in range(2)]
    return MethodContext(model=model, task=get_task("causal_lm"), forget=data, retain=data, device=CPU,
                         generator=torch.Generator().manual_seed(0))


def build(name: str, model: nn.Module, **values):
    return get(name)(make_config(name, {"lora": None, **values}), context_for(model))


def test_graddiff_objective_is_gamma_times_minus_forget_nll_plus_alpha_times_retain_nll():
    method = build("graddiff", Bigram(TABLE), gamma=0.7, alpha=2.0)
    loss, stats = method.objective(BATCH, BATCH)
    nll = sum(sum(seq) / len(seq) for seq in token_nlls(TABLE)) / 2  # per-sequence token means, averaged
    assert float(loss.detach()) == pytest.approx(0.7 * -nll + 2.0 * nll, rel=1e-6)
    assert stats["forget_loss"] == pytest.approx(nll, rel=1e-6)
    assert stats["retain_term"] == pytest.approx(nll, rel=1e-6)


def test_graddiff_kl_retain_term_is_the_original_to_model_kl_over_non_padding_positions():
    model = Bigram(TABLE)
    method = build("graddiff", model, retain_loss="kl")
    with torch.no_grad():
        model.table[1, 0] += 1.5  # the model drifts away from the frozen original on token 1's row
        model.table[3, 2] -= 0.8
    moved = model.table.tolist()
    kls = []
    for ids, mask in zip(BATCH["input_ids"].tolist(), BATCH["attention_mask"].tolist(), strict=True):
        for t in range(len(ids) - 1):  # the logits at positions 0..T-2, counted where attended
            if mask[t]:
                p = [math.exp(log_softmax(TABLE[ids[t]], v)) for v in range(VOCAB)]
                kls.append(sum(p[v] * (math.log(p[v]) - log_softmax(moved[ids[t]], v)) for v in range(VOCAB)))
    assert len(kls) == 6 and max(kls) > 0.01
    assert float(method.retain_term(BATCH).detach()) == pytest.approx(sum(kls) / len(kls), rel=1e-5)
    unmoved = build("graddiff", Bigram(TABLE), retain_loss="kl")
    assert float(unmoved.retain_term(BATCH).detach()) == pytest.approx(0, abs=1e-7)


def test_simnpo_loss_by_hand_and_on_length_normalised_sequence_losses():
    mean_nll, beta, delta = torch.tensor([0.2, 1.5, 3.0]), 2.5, 0.4
    by_hand = -(2 / beta) * sum(math.log(1 / (1 + math.exp(-beta * (v - delta)))) for v in mean_nll.tolist()) / 3
    assert float(simnpo_loss(mean_nll, beta=beta, delta=delta)) == pytest.approx(by_hand, rel=1e-6)
    method = build("simnpo", Bigram(TABLE), beta=beta, delta=delta, gamma=0.125, alpha=1.0)
    means = [sum(seq) / len(seq) for seq in token_nlls(TABLE)]  # the 2-token answer is divided by 2, not summed
    expected_forget = -(2 / beta) * sum(math.log(1 / (1 + math.exp(-beta * (m - delta)))) for m in means) / 2
    loss, stats = method.objective(BATCH, BATCH)
    assert stats["forget_term"] == pytest.approx(expected_forget, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(0.125 * expected_forget + sum(means) / 2, rel=1e-6)


def test_simnpo_gradient_raises_the_forget_loss():
    nll = torch.tensor([0.5, 1.0], requires_grad=True)
    simnpo_loss(nll, beta=4.5, delta=0.0).backward()
    assert bool((nll.grad < 0).all())  # descending the loss increases each sequence's NLL


def test_rmu_activation_loss_by_hand():
    activations = torch.tensor([[[1.0, 2.0], [0.0, -1.0], [5.0, 5.0]]])
    target = torch.tensor([0.5, 0.5])
    labels = torch.tensor([[-100, 7, 7]])  # the first token is a prompt: not counted
    # token 2: ((0-0.5)^2 + (-1-0.5)^2) / 2 = 1.25; token 3: (4.5^2 * 2) / 2 = 20.25; mean 10.75
    assert float(activation_loss(activations, target, labels)) == pytest.approx(10.75)


def test_rmu_steering_vector_has_the_coefficient_as_norm_and_non_negative_entries():
    vector = steering_vector(16, coeff=6.5, generator=torch.Generator().manual_seed(3))
    assert float(vector.norm()) == pytest.approx(6.5, rel=1e-6) and bool((vector >= 0).all())


def test_rmu_objective_by_hand_on_a_model_with_known_hidden_states():
    model = Bigram(TABLE)
    method = build("rmu", model, layer=1, steering_coeff=3.0, gamma=1.0, alpha=4.0)
    with torch.no_grad():
        model.table[2, 1] += 1.0  # retain activations now differ from the original's on token 2's row
    loss, stats = method.objective(BATCH, BATCH)
    u = method.control.tolist()
    assert method.layer == 1 and math.sqrt(sum(v * v for v in u)) == pytest.approx(3.0, rel=1e-6)
    moved = model.table.tolist()

    def per_sequence(fn):
        out = []
        for ids, labels in zip(BATCH["input_ids"].tolist(), BATCH["labels"].tolist(), strict=True):
            terms = [sum(fn(ids[t], d) for d in range(VOCAB)) / VOCAB for t in range(len(ids)) if labels[t] != -100]
            out.append(sum(terms) / len(terms))
        return sum(out) / len(out)

    forget = per_sequence(lambda token, d: (3.0 * moved[token][d] - u[d]) ** 2)  # layer 1's output is 3 x row
    retain = per_sequence(lambda token, d: (3.0 * moved[token][d] - 3.0 * TABLE[token][d]) ** 2)
    assert retain > 0.1
    assert stats["forget_term"] == pytest.approx(forget, rel=1e-5)
    assert stats["retain_term"] == pytest.approx(retain, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(forget + 4.0 * retain, rel=1e-5)


def test_rmu_default_layer_is_a_quarter_of_the_depth_and_bad_layers_are_refused():
    model, task = tiny_llama(), get_task("causal_lm")
    batch = next(iter(DataLoader(QADataset(2, seed=0), batch_size=2, collate_fn=task.collate_fn())))
    with torch.no_grad():
        activations, layer = layer_output(model, batch, layer=None)
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True).hidden_states[1]
    assert layer == 0  # (2 - 1) // 4
    torch.testing.assert_close(activations, expected)
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        layer_output(model, batch, layer=5)


def test_configs_validate_and_methods_are_registered():
    assert {"graddiff", "simnpo", "rmu", "npo", "neggrad"} <= set(og.methods.available())
    with pytest.raises(ValueError, match="gamma"):
        ForgetRetainConfig(gamma=0.0)
    with pytest.raises(ValueError, match="retain_loss must be one of"):
        ForgetRetainConfig(retain_loss="mse")
    with pytest.raises(ValueError, match="beta"):
        SimNPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="steering_coeff"):
        RMUConfig(steering_coeff=-1.0)
    assert RMUConfig().retain_loss == "activations" and SimNPOConfig().gamma == 0.125
    with pytest.raises(ValueError, match="supports tasks"):
        og.unlearn(nn.Linear(3, 2), [(torch.zeros(3), 0)], [(torch.ones(3), 1)], method="rmu", device="cpu")


@pytest.mark.parametrize("method,kwargs", [
    ("graddiff", {"lr": 0.02}),
    ("graddiff", {"lr": 0.02, "retain_loss": "kl"}),
    ("simnpo", {"lr": 0.05}),
    ("rmu", {"lr": 0.02, "steering_coeff": 20.0}),
])
def test_language_model_methods_lower_forget_answer_probability_on_a_llama(method, kwargs):
    result = og.unlearn(
        tiny_llama(), QADataset(6, seed=1), QADataset(12, seed=2), test=QADataset(6, seed=3), task="causal_lm",
        method=method, max_epochs=4, device="cpu", forget_batch_size=3, retain_batch_size=6,
        lora={"r": 4, "targets": list(LLAMA_LORA)}, stop="never", **kwargs,  # the whole budget: no inferred rule
    )
    assert result.stop_reason == "max_epochs"
    assert all(math.isfinite(v) for row in result.history for v in row.values() if isinstance(v, float))
    assert result.final["forget"] < result.original["forget"]
