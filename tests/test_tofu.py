"""The offline TOFU-style pieces: fictitious authors, QA samples, and TOFU's metrics against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_helpers import tiny_llama

from orthograd.data.authors import FACTS, forget_authors, generate_authors, qa_pairs
from orthograd.data.world import COUNTRIES, REAL_AUTHORS, general_knowledge
from orthograd.tasks.qa_text import QAEncoder, load_folder_encoder, train_bpe_tokenizer, train_tokenizer
from orthograd.tasks.tofu import (
    answer_losses,
    forget_quality,
    harmonic_mean,
    option_probabilities,
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
    for ratio, pair in zip(ratios, chosen, strict=True):
        paraphrase = answer_losses(model, [pair.question], [pair.paraphrase], encoder=encoder, device=CPU)[0]
        wrong = answer_losses(model, [pair.question] * 3, list(pair.perturbed), encoder=encoder, device=CPU)
        assert ratio == pytest.approx(np.exp(wrong.mean() - paraphrase), rel=1e-5)
    metrics = tofu_metrics(model, forget=chosen, retained={"retain": pairs[4:8]}, encoder=encoder, device=CPU,
                           retrained_forget_ratios=ratios, reference_inverted=False, max_new_tokens=4)
    assert metrics["forget_quality"] == pytest.approx(1.0)  # identical truth-ratio distributions
    assert 0 <= metrics["model_utility"] <= 1 and 0 < metrics["forget_probability"] < 1


def test_aggregate_scores():
    assert truth_score(np.array([2.0, 0.5, 1.0])) == pytest.approx((0.5 + 0 + 0) / 3)
    assert harmonic_mean([0.5, 0.25]) == pytest.approx(1 / 3) and harmonic_mean([0.5, 0.0]) == 0.0
    low, high = np.linspace(0.1, 0.5, 30), np.linspace(2.0, 3.0, 30)
    assert forget_quality(low, high, inverted=False) < 1e-6
    assert forget_quality(low, low, inverted=False) == pytest.approx(1.0)


def test_a_retrained_reference_stored_inverted_must_say_so():
    """TOFU's logs store 1/R: the flag turns it back; without the flag the metrics refuse to guess."""
    unlearned, reference = np.linspace(0.5, 1.5, 40), np.linspace(0.6, 1.6, 40)
    same = forget_quality(unlearned, reference, inverted=False)
    assert forget_quality(unlearned, 1.0 / reference, inverted=True) == pytest.approx(same)
    assert forget_quality(unlearned, 1.0 / reference, inverted=False) != pytest.approx(same)
    for bad in (np.array([1.0, -0.5]), np.array([np.inf]), np.array([])):
        with pytest.raises(ValueError, match="positive finite"):
            forget_quality(unlearned, bad, inverted=False)


def test_model_utility_is_the_harmonic_mean_of_nine_numbers_with_option_normalised_probabilities(corpus):
    _, pairs, _ = corpus
    knowledge = general_knowledge(seed=0)
    texts = [t for p in (*pairs, *knowledge.training) for t in (p.question, p.answer, *p.perturbed)]
    encoder = QAEncoder(train_tokenizer([*texts, "Question: Answer:"]))
    model = tiny_llama()
    model.resize_token_embeddings(encoder.vocab_size)
    facts, people = knowledge.world_facts[:3], knowledge.real_authors[:3]
    with pytest.raises(ValueError, match="reference_inverted"):
        tofu_metrics(model, forget=pairs[:2], retained={"retain": pairs[4:6]}, encoder=encoder, device=CPU,
                     retrained_forget_ratios=np.ones(2))
    metrics = tofu_metrics(model, forget=pairs[:2], retained={"retain": pairs[4:6], "real_authors": people,
                                                              "world_facts": facts},
                           encoder=encoder, device=CPU, normalised=("real_authors", "world_facts"), max_new_tokens=4)
    parts = [metrics[f"{name}_{entry}"] for name in ("retain", "real_authors", "world_facts")
             for entry in ("probability", "rouge_l", "truth")]
    assert len(parts) == 9 and metrics["model_utility"] == pytest.approx(harmonic_mean(parts))
    by_hand = []
    for pair in facts:
        true = np.exp(-answer_losses(model, [pair.question], [pair.answer], encoder=encoder, device=CPU)[0])
        wrong = np.exp(-answer_losses(model, [pair.question] * 3, list(pair.perturbed), encoder=encoder, device=CPU))
        by_hand.append(true / (true + wrong.sum()))
    assert option_probabilities(model, facts, encoder=encoder, device=CPU) == pytest.approx(by_hand, rel=1e-5)
    assert metrics["world_facts_probability"] == pytest.approx(np.mean(by_hand), rel=1e-5)
    with pytest.raises(ValueError, match="normalised"):
        tofu_metrics(model, forget=pairs[:2], retained={"retain": pairs[4:6]}, encoder=encoder, device=CPU,
                     normalised=("world_facts",))


def test_general_knowledge_is_deterministic_with_wrong_options_of_the_same_fact():
    knowledge = general_knowledge(seed=0)
    assert knowledge == general_knowledge(seed=0) and knowledge != general_knowledge(seed=1)
    assert len(knowledge.real_authors) == 3 * len(REAL_AUTHORS)
    assert sum(p.fact == "capital" for p in knowledge.world_facts) == len(COUNTRIES)
    assert len(knowledge.training) == 2 * (len(knowledge.world_facts) + len(knowledge.real_authors))  # 2 phrasings
    paris = next(p for p in knowledge.world_facts if p.question == "What is the capital of France?")
    assert paris.answer == paris.paraphrase == "The capital of France is Paris."
    assert len(paris.perturbed) == 3 and all("Paris" not in w and w.startswith("The capital of France is ")
                                             for w in paris.perturbed)
    assert {len(p.perturbed) for p in knowledge.training} == {3}


def test_byte_level_bpe_round_trips_unseen_text_and_a_model_folder_brings_its_own_tokenizer(tmp_path):
    tokenizer = train_bpe_tokenizer(["The capital of France is Paris.", "Question: Answer:"] * 5, vocab_size=300)
    encoder = QAEncoder(tokenizer)
    assert encoder.vocab_size <= 300 and (encoder.pad_token_id, encoder.eos_token_id) == (0, 1)
    item = encoder.item("Where is Zürich?", "Zürich lies in Switzerland.")  # unseen words and bytes
    answer = item["labels"][item["labels"] != -100].tolist()
    assert answer[-1] == encoder.eos_token_id and encoder.decode(answer) == "Zürich lies in Switzerland."
    assert tokenizer.token_to_id("[UNK]") not in item["input_ids"].tolist()
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_folder_encoder(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": {"content": "[EOS]"}}')
    loaded = load_folder_encoder(tmp_path)
    assert loaded.eos_token_id == loaded.pad_token_id == 1  # no padding token named: the end token pads
    assert loaded.item("Where is Zürich?", "Zürich lies in Switzerland.")["input_ids"].tolist() == \
        item["input_ids"].tolist()
    with pytest.raises(ValueError, match="no token"):
        QAEncoder(tokenizer, eos_token="</s>")
