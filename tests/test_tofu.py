"""The offline TOFU-style pieces: fictitious authors, QA samples, and TOFU's metrics against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_helpers import tiny_llama

from orthograd.data.authors import FACTS, forget_authors, generate_authors, qa_pairs
from orthograd.tasks.qa_text import QAEncoder, train_tokenizer
from orthograd.tasks.tofu import (
    answer_losses,
    forget_quality,
    harmonic_mean,
    tofu_metrics,
    truth_ratios,
    truth_score,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def corpus():
    authors = generate_authors(6, seed=3)
    pairs = qa_pairs(authors, seed=3)
    texts = [t for p in pairs for t in (p.question, p.answer, p.paraphrase, *p.perturbed)] + ["Question: Answer:"]
    return authors, pairs, QAEncoder(train_tokenizer(texts))


def test_authors_are_reproducible_and_distinct():
    assert generate_authors(50, seed=1) == generate_authors(50, seed=1)
    assert generate_authors(50, seed=1) != generate_authors(50, seed=2)
    authors = generate_authors(200, seed=0)
    assert len({a.name for a in authors}) == 200 and all(a.facts["debut"] != a.facts["latest"] for a in authors)
    assert [len(forget_authors(200, fraction=f)) for f in (0.01, 0.05, 0.1)] == [2, 10, 20]
    with pytest.raises(ValueError, match="at most"):
        generate_authors(10_000)


def test_qa_pairs_hold_about_twenty_questions_per_author_with_wrong_paraphrases(corpus):
    authors, pairs, _ = corpus
    per_author = len(pairs) / len(authors)
    assert per_author == sum(len(q) for q, _, _ in FACTS.values()) and 18 <= per_author <= 22
    for pair in pairs:
        value = authors[pair.author].facts[pair.fact]
        assert value in pair.answer and value in pair.paraphrase and pair.answer != pair.paraphrase
        assert len(pair.perturbed) == 3 and all(value not in wrong for wrong in pair.perturbed)
    assert sum(p.held_out for p in pairs) == len(FACTS) * len(authors)  # one held-out phrasing per fact


def test_samples_label_only_the_answer_and_decode_back(corpus):
    _, pairs, encoder = corpus
    item = encoder.item(pairs[0].question, pairs[0].answer)
    answer = item["labels"][item["labels"] != -100].tolist()
    assert answer[-1] == encoder.eos_token_id and item["input_ids"][-len(answer):].tolist() == answer
    assert encoder.decode(answer).replace(" .", ".") == pairs[0].answer


def test_truth_ratio_is_the_normalised_paraphrase_probability_over_the_perturbed_ones(corpus):
    _, pairs, encoder = corpus
    model = tiny_llama()
    model.resize_token_embeddings(encoder.vocab_size)
    chosen = pairs[:4]
    ratios = truth_ratios(model, chosen, encoder=encoder, device=CPU)
    for ratio, pair in zip(ratios, chosen):
        paraphrase = answer_losses(model, [pair.question], [pair.paraphrase], encoder=encoder, device=CPU)[0]
        wrong = answer_losses(model, [pair.question] * 3, list(pair.perturbed), encoder=encoder, device=CPU)
        assert ratio == pytest.approx(np.exp(wrong.mean() - paraphrase), rel=1e-5)
    metrics = tofu_metrics(model, forget=chosen, retained={"retain": pairs[4:8]}, encoder=encoder, device=CPU,
                           retrained_forget_ratios=ratios)
    assert metrics["forget_quality"] == pytest.approx(1.0)  # identical truth-ratio distributions
    assert 0 <= metrics["model_utility"] <= 1 and 0 < metrics["forget_probability"] < 1


def test_aggregate_scores():
    assert truth_score(np.array([2.0, 0.5, 1.0])) == pytest.approx((0.5 + 0 + 0) / 3)
    assert harmonic_mean([0.5, 0.25]) == pytest.approx(1 / 3) and harmonic_mean([0.5, 0.0]) == 0.0
    low, high = np.linspace(0.1, 0.5, 30), np.linspace(2.0, 3.0, 30)
    assert forget_quality(low, high) < 1e-6 and forget_quality(low, low) == pytest.approx(1.0)
