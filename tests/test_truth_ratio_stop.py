"""TOFU's forget-quality reading as a stop rule without a retrained model: KS test of the forget questions' truth
ratios against never-seen questions', measured by the runner at every check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_helpers import tiny_llama

import orthograd as og
from orthograd.data.authors import generate_authors, qa_pairs
from orthograd.methods.orthograd.controller import ProgressMeter
from orthograd.tasks.qa_text import QAEncoder, train_tokenizer
from orthograd.tasks.tofu import TruthRatioRule, answer_losses, forget_quality, truth_ratios

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def corpus():
    pairs = qa_pairs(generate_authors(4, seed=5), seed=5)
    texts = [t for p in pairs for t in (p.question, p.answer, p.paraphrase, *p.perturbed)] + ["Question: Answer:"]
    encoder = QAEncoder(train_tokenizer(texts))
    model = tiny_llama()
    model.resize_token_embeddings(encoder.vocab_size)
    return pairs, encoder, model


def test_measure_is_the_ks_p_value_between_forget_and_never_seen_truth_ratios(corpus):
    pairs, encoder, model = corpus
    forget, never_seen = pairs[:8], pairs[40:50]
    rule = TruthRatioRule(forget=forget, never_seen=never_seen, encoder=encoder, level=0.05)
    expected = forget_quality(truth_ratios(model, forget, encoder=encoder, device=CPU),
                              truth_ratios(model, never_seen, encoder=encoder, device=CPU), inverted=False)
    measured = rule.measure(model)
    assert measured == {"truth_ratio_ks_p": pytest.approx(expected)}
    assert rule({"truth_ratio_ks_p": 0.2}) and not rule({"truth_ratio_ks_p": 0.01})
    same = TruthRatioRule(forget=forget, never_seen=forget, encoder=encoder)
    assert same.measure(model)["truth_ratio_ks_p"] == pytest.approx(1.0)  # identical distributions


def test_target_is_the_never_seen_answer_probability_of_the_original_plus_half_a_point(corpus):
    pairs, encoder, model = corpus
    rule = TruthRatioRule(forget=pairs[:4], never_seen=pairs[40:46], encoder=encoder, original=model)
    losses = answer_losses(model, [p.question for p in pairs[40:46]], [p.answer for p in pairs[40:46]],
                           encoder=encoder, device=CPU)
    assert rule.target == pytest.approx(100 * float(np.exp(-losses).mean()) + 0.5)
    assert TruthRatioRule(forget=pairs[:4], never_seen=pairs[40:46], encoder=encoder).target is None
    with pytest.raises(ValueError, match="level"):
        TruthRatioRule(forget=pairs[:4], never_seen=pairs[40:46], encoder=encoder, level=1.5)
    with pytest.raises(ValueError, match="never_seen"):
        TruthRatioRule(forget=pairs[:4], never_seen=[], encoder=encoder)


def test_unlearn_writes_the_rules_metric_into_every_row_and_stops_on_it(corpus):
    pairs, encoder, model = corpus
    forget, retain, never_seen = pairs[:6], pairs[6:30], pairs[40:50]
    items = [encoder.item(p.question, p.answer) for p in forget], [encoder.item(p.question, p.answer) for p in retain]
    class Unreachable(TruthRatioRule):  # measures as the rule does, never fires
        def __call__(self, row):
            assert 0.0 <= row[self.metric] <= 1.0
            return False

    unreachable = Unreachable(forget=forget, never_seen=never_seen, encoder=encoder)
    with pytest.warns(UserWarning, match="without reaching"):
        result = og.unlearn(model, *items, task="causal_lm", stop=unreachable, max_epochs=1, device="cpu", lr=1e-2,
                            forget_batch_size=3, retain_batch_size=8)
    assert result.stop_reason == "max_epochs" and len(result.history) >= 2
    assert all(0.0 <= row["truth_ratio_ks_p"] <= 1.0 for row in result.history)
    assert result.history[0]["truth_ratio_ks_p"] == pytest.approx(unreachable.measure(model)["truth_ratio_ks_p"])
    at_once = TruthRatioRule(forget=forget, never_seen=forget, encoder=encoder)  # p = 1 before any step
    assert og.unlearn(model, *items, task="causal_lm", stop=at_once, device="cpu").steps == 0


def test_the_pace_rule_holds_once_the_forget_metric_is_past_its_target():
    meter = ProgressMeter(higher_is_better=True, target=5.0)
    meter.progressed(forget_metric=6.0, forget_loss=1.0, steps=1, steps_left=10)
    assert meter.progressed(forget_metric=4.0, forget_loss=1.0, steps=1, steps_left=10)
    assert meter.progressed(forget_metric=2.0, forget_loss=1.0, steps=1, steps_left=10)  # moving away, but past it
