"""task="causal_lm": answer-only sequence loss, per-sample gradients over sequences, metrics, methods via unlearn."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hf_helpers import GPT2_LORA, LLAMA_LORA, QADataset, assert_ghost_matches_loop, tiny_gpt2, tiny_llama
from torch import nn
from torch.utils.data import DataLoader

import orthograd as og
from orthograd.lora import LoRAConfig, attach_lora
from orthograd.tasks import CausalLMTask, get_task

CPU = torch.device("cpu")


def _batch(task: CausalLMTask, n: int = 4, *, seed: int = 0) -> dict[str, torch.Tensor]:
    return next(iter(DataLoader(QADataset(n, seed=seed), batch_size=n, collate_fn=task.collate_fn())))


def test_sequence_loss_is_the_mean_answer_token_cross_entropy_as_transformers_computes_it():
    task, model = get_task("causal_lm"), tiny_gpt2()
    batch = _batch(task)
    assert (batch["labels"] == -100).any(dim=1).all() and (batch["attention_mask"] == 0).any()  # prompts and padding
    with torch.no_grad():
        losses = task.per_sample_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i in range(4):
        answer = (batch["labels"][i] != -100).nonzero().flatten()
        by_hand = -torch.stack([F.log_softmax(logits[i, t - 1], -1)[batch["labels"][i, t]] for t in answer]).mean()
        length = int(batch["attention_mask"][i].sum())
        with torch.no_grad():
            hf = model(
                input_ids=batch["input_ids"][i : i + 1, :length], labels=batch["labels"][i : i + 1, :length]
            ).loss
        torch.testing.assert_close(losses[i], by_hand, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(losses[i], hf, atol=1e-5, rtol=1e-5)
    summed = task.per_sample_nll(model, batch)
    counts = (batch["labels"][:, 1:] != -100).sum(dim=1)
    torch.testing.assert_close(summed, losses * counts, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("build,targets", [(tiny_gpt2, GPT2_LORA), (tiny_llama, LLAMA_LORA)], ids=["gpt2", "llama"])
def test_lora_per_sample_grads_over_sequences_equal_batch_size_one_loop(build, targets):
    task = get_task("causal_lm")
    model = attach_lora(build(), LoRAConfig(r=2, targets=targets), seed=0)
    with torch.no_grad():  # B = 0 at initialisation would leave the A factors without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("mlp" in n for n in names) and any("attn" in n for n in names)
    assert_ghost_matches_loop(model, task.per_sample_loss, _batch(task, 3, seed=1), names)


def test_full_llama_with_rms_norms_per_sample_grads_equal_batch_size_one_loop():
    task, model = get_task("causal_lm"), tiny_llama()
    names = [n for n, _ in model.named_parameters() if "norm" in n or "o_proj" in n or n.startswith("lm_head")]
    assert any("layernorm" in n for n in names)
    assert_ghost_matches_loop(model, task.per_sample_loss, _batch(task, 3, seed=2), names)


def test_orthograd_unlearns_a_causal_lm_from_dict_datasets_with_the_ghost_engine():
    model = tiny_gpt2()
    result = og.unlearn(
        model,
        QADataset(6, seed=1),
        QADataset(12, seed=2),
        test=QADataset(6, seed=3),
        task="causal_lm",
        stop="never",  # the whole budget: the forget answers start no likelier than the test answers
        max_epochs=3,
        device="cpu",
        lr=0.5,
        alpha=0.5,
        forget_batch_size=3,
        retain_batch_size=6,
        lora={"r": 4, "targets": list(GPT2_LORA)},
    )
    assert type(result.model) is type(model)
    assert all(row["engine_ghost"] == 1.0 for row in result.history[1:])
    assert result.final["forget"] < result.original["forget"]  # forget answers became less likely
    expected = get_task("causal_lm").evaluate(
        result.model,
        DataLoader(QADataset(6, seed=1), batch_size=6, collate_fn=get_task("causal_lm").collate_fn()),
        device=CPU,
    )
    assert result.final["forget"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method,kwargs", [
    ("neggrad", {"lr": 0.05, "momentum": 0.0}),
    ("neggrad+", {"lr": 0.5}),
    ("finetune", {"lr": 0.05}),
    ("scrub", {"lr": 0.01, "msteps": 1}),
    ("npo", {"lr": 0.05}),
])
def test_language_model_baselines_run_on_a_llama_with_lora_on_attention_and_mlp(method, kwargs):
    result = og.unlearn(
        tiny_llama(),
        QADataset(6, seed=1),
        QADataset(12, seed=2),
        test=QADataset(6, seed=3),
        task="causal_lm",
        method=method,
        stop="never",  # the whole budget: the forget answers start no likelier than the test answers
        max_epochs=2,
        device="cpu",
        forget_batch_size=3,
        retain_batch_size=6,
        lora={"r": 4, "targets": list(LLAMA_LORA)},
        **kwargs,
    )
    assert result.stop_reason == "max_epochs"
    assert all(math.isfinite(v) for row in result.history for v in row.values() if isinstance(v, float))
    if method in ("neggrad", "npo"):
        assert result.final["forget"] < result.original["forget"]


def test_answer_probability_is_the_mean_of_exp_minus_sequence_loss():
    task, model = get_task("causal_lm"), tiny_llama()
    loader = DataLoader(QADataset(5, seed=4), batch_size=2, collate_fn=task.collate_fn())
    losses = task.sequence_losses(model, loader, device=CPU)
    assert losses.shape == (5,)
    assert task.evaluate(model, loader, device=CPU) == pytest.approx(100 * float(losses.neg().exp().mean()), rel=1e-5)
    assert og.evaluate(model, QADataset(5, seed=4), task="causal_lm", device="cpu") == {
        "answer_probability": pytest.approx(100 * float(losses.neg().exp().mean()), rel=1e-5)
    }


class NextToken(nn.Module):
    """A fake LM that always predicts the previous token plus one (no cache): greedy answers are known."""

    def __init__(self, vocab: int = 12) -> None:
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"logits": self.scale * 10.0 * F.one_hot((input_ids + 1) % self.vocab, self.vocab).float()}


def test_greedy_answers_and_rouge_l_recall():
    task = CausalLMTask(metric="rouge_l", max_new_tokens=3)
    items = [
        {"input_ids": torch.tensor([1, 2, 3, 4, 5, 9]), "labels": torch.tensor([-100, -100, -100, 4, 5, 9])},
        {"input_ids": torch.tensor([6, 7, 8, 9]), "labels": torch.tensor([-100, -100, 8, 9])},
        {"input_ids": torch.tensor([2, 3, 4, 5, 6]), "labels": torch.tensor([-100, -100, -100, 5, 6])},
    ]
    loader = DataLoader(items, batch_size=3, collate_fn=task.collate_fn())
    batch = next(iter(loader))
    assert task.generate(NextToken(), batch) == [[4, 5, 6], [8, 9, 10], [5, 6, 7]]  # prompts of length 3 together
    assert task.rouge_l(NextToken(), loader, device=CPU).tolist() == pytest.approx([2 / 3, 1.0, 1.0])
    assert task.evaluate(NextToken(), loader, device=CPU) == pytest.approx(100 * (2 / 3 + 1.0 + 1.0) / 3)
    words = CausalLMTask(metric="rouge_l", max_new_tokens=3,
                         decode=lambda ids: " ".join("x" if i in (6, 9) else str(i) for i in ids))
    assert words.rouge_l(NextToken(), loader, device=CPU).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_greedy_answers_run_past_the_reference_to_the_end_token_and_rouge_l_stems_words():
    """TOFU generates up to 200 new tokens, so a correct answer longer than the reference is not cut; its ROUGE-L
    stems words ("novels" matches "novel")."""
    item = {"input_ids": torch.tensor([1, 2, 3, 4]), "labels": torch.tensor([-100, -100, -100, 4])}
    batch = {k: v[None] for k, v in item.items()}
    assert CausalLMTask(eos_token_id=9).generate(NextToken(), batch) == [[4, 5, 6, 7, 8, 9]]
    assert len(CausalLMTask().generate(NextToken(), batch)[0]) == 200  # no end token: TOFU's 200 new tokens
    words = {4: "the", 5: "novels", 6: "were", 7: "good", 8: "ones", 10: "novel"}
    task = CausalLMTask(eos_token_id=9, decode=lambda ids: " ".join(words.get(i, "") for i in ids))
    reference = {"input_ids": torch.tensor([1, 2, 3, 4, 10]), "labels": torch.tensor([-100, -100, -100, 4, 10])}
    loader = DataLoader([reference], batch_size=1, collate_fn=task.collate_fn())
    assert task.rouge_l(NextToken(), loader, device=CPU).tolist() == pytest.approx([1.0])
    silent = {"input_ids": torch.tensor([7, 8, 4]), "labels": torch.tensor([-100, -100, 4])}  # answers the end token
    loader = DataLoader([silent], batch_size=1, collate_fn=task.collate_fn())
    scores = task.rouge_l(NextToken(), loader, device=CPU)
    assert scores.dtype == torch.float32 and scores.tolist() == [0.0]  # an empty answer scores a float 0


def test_greedy_answers_with_the_key_value_cache_match_transformers_generate():
    model = tiny_gpt2()
    item = QADataset(1, seed=5)[0]
    start = int((item["labels"] != -100).nonzero()[0])
    batch = {k: v.unsqueeze(0) for k, v in item.items()}
    ours = CausalLMTask(max_new_tokens=6, eos_token_id=-1).generate(model, batch)[0]
    with torch.no_grad():
        theirs = model.generate(item["input_ids"][None, :start], max_new_tokens=6, do_sample=False, eos_token_id=None,
                                pad_token_id=0, attention_mask=torch.ones(1, start, dtype=torch.long))
    assert ours == theirs[0, start:].tolist()


def test_replace_targets_keeps_the_first_label_and_round_trips():
    task = get_task("causal_lm")
    batch = _batch(task, 3, seed=6)
    swapped = task.replace_targets(batch, torch.zeros_like(task.targets(batch)))
    assert swapped["labels"][:, 0].tolist() == batch["labels"][:, 0].tolist()
    assert (task.targets(swapped) == 0).all()
    assert torch.equal(task.targets(task.replace_targets(swapped, task.targets(batch))), task.targets(batch))


def test_malformed_language_model_data_gets_clear_errors():
    model = tiny_gpt2()
    pairs = [(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])) for _ in range(2)]
    with pytest.raises(ValueError, match=r"expects dataset items as dicts with 'input_ids'; got tuple\(Tensor\[3\]"):
        og.unlearn(model, pairs, pairs, task="causal_lm", device="cpu", check_overlap=False)
    unlabelled = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, -100, -100])}]
    with pytest.raises(ValueError, match="sample 0 of the forget set has no labelled token"):
        og.unlearn(model, unlabelled, QADataset(2, seed=1), task="causal_lm", device="cpu")
    with pytest.raises(ValueError, match=r"'input_ids' \[B, T\] and 'labels'"):
        get_task("causal_lm").to_device({"input_ids": torch.ones(2, 3, dtype=torch.long)}, CPU)
    with pytest.raises(ValueError, match="metric must be one of"):
        CausalLMTask(metric="bleu")  # type: ignore[arg-type]


def test_sequences_without_labels_learn_every_token():
    task = get_task("causal_lm")
    batch = task.collate_fn()([{"input_ids": [3, 4, 5]}, {"input_ids": [6, 7]}])
    assert batch["labels"].tolist() == [[3, 4, 5], [6, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_loss_based_membership_outputs_are_the_sequence_losses():
    from orthograd.privacy import sample_outputs

    task, model = get_task("causal_lm"), tiny_llama()
    data = QADataset(5, seed=7)
    outputs = sample_outputs(model, data, task="causal_lm", device="cpu", batch_size=2)
    expected = task.sequence_losses(model, DataLoader(data, batch_size=5, collate_fn=task.collate_fn()), device=CPU)
    assert outputs.probs is None
    torch.testing.assert_close(torch.from_numpy(outputs.losses).float(), expected, atol=1e-5, rtol=1e-5)
