"""Hugging Face models as they are: dict batches, ModelOutput logits, Conv1D / RMSNorm rules, LoRA targets, errors."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from hf_helpers import assert_ghost_matches_loop
from torch import nn
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

import orthograd as og
from orthograd.grads import ghost_layers, per_sample_grads
from orthograd.grads.ghost import unsupported_reason
from orthograd.lora import LoRAConfig, attach_lora, default_lora_targets
from orthograd.tasks import ClassificationTask, get_task
from orthograd.tasks.batches import pad_collate

VOCAB, LENGTH = 30, 6


class DictDataset(Dataset):
    """Token sequences and class labels as Hugging Face style dicts."""

    def __init__(self, n: int, *, seed: int, extra: dict | None = None) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen)
        self.labels = torch.randint(0, 3, (n,), generator=gen)
        self.extra = extra or {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        mask = torch.ones(LENGTH, dtype=torch.long)
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.labels[i], **self.extra}


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    return BertForSequenceClassification(config)


def _gpt2_classifier() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16, num_labels=3, pad_token_id=0)
    return GPT2ForSequenceClassification(config)


class Conv1DNet(nn.Module):
    """Embedding -> Conv1D -> tanh -> RMSNorm -> Conv1D -> LlamaRMSNorm -> mean pool -> Linear: HF layers in a
    plain net."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.up = Conv1D(12, 8)  # transformers' argument order: (out features, in features)
        self.norm = nn.RMSNorm(12)
        self.down = Conv1D(8, 12)
        self.llama_norm = LlamaRMSNorm(8)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():  # norm weights away from 1, so that a wrong rule cannot pass by symmetry
            self.norm.weight.uniform_(0.5, 1.5)
            self.llama_norm.weight.uniform_(0.5, 1.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.llama_norm(self.down(self.norm(torch.tanh(self.up(self.embed(tokens))))))
        return self.head(hidden.mean(dim=1))


def _ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_conv1d_and_rms_norms_per_sample_grads_equal_batch_size_one_loop():
    torch.manual_seed(0)
    model = Conv1DNet()
    batch = (torch.randint(0, VOCAB, (5, 7)), torch.randint(0, 3, (5,)))
    names = [n for n, _ in model.named_parameters() if not n.startswith("embed")]
    assert unsupported_reason(model, names) is None
    loop = per_sample_grads(model, _ce, batch, params=names, engine="loop")
    vmapped = per_sample_grads(model, _ce, batch, params=names, engine="vmap")
    for name in names:
        torch.testing.assert_close(vmapped[name], loop[name], atol=1e-6, rtol=1e-5)
    assert_ghost_matches_loop(model, _ce, batch, names)


def test_conv1d_lora_per_sample_grads_equal_batch_size_one_loop():
    torch.manual_seed(0)
    model = attach_lora(Conv1DNet(), LoRAConfig(r=2, targets=("up", "down")), seed=0)
    with torch.no_grad():  # B = 0 at initialisation would leave the A factors without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    batch = (torch.randint(0, VOCAB, (4, 6)), torch.randint(0, 3, (4,)))
    assert_ghost_matches_loop(model, _ce, batch, names)


def test_gpt2_default_lora_targets_cover_attention():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16))
    targets = default_lora_targets(model)
    assert sorted(targets) == sorted(f"transformer.h.{i}.attn.{p}" for i in range(2) for p in ("c_attn", "c_proj"))
    classifier_targets = default_lora_targets(_gpt2_classifier())
    assert "score" not in classifier_targets and any(t.endswith("attn.c_attn") for t in classifier_targets)
    adapted = attach_lora(model, LoRAConfig(r=2), seed=0)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert any("attn.c_attn.lora_A" in n for n in trainable) and any("attn.c_proj.lora_B" in n for n in trainable)
    assert not any("mlp" in n for n in trainable)


def test_bert_default_targets_are_its_attention_projections():
    targets = default_lora_targets(_bert())
    leaves = {t.rsplit(".", 1)[-1] for t in targets}
    assert {"query", "key", "value"} <= leaves and all(".attention." in t for t in targets)


def test_default_targets_logged_and_head_only_warned(caplog):
    class RecurrentClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(8, 16, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    with caplog.at_level(logging.INFO, logger="orthograd.lora"):
        attach_lora(RecurrentClassifier(), LoRAConfig(r=2), seed=0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "only 'head'" in warnings[0].getMessage()
    assert any("default targets" in r.getMessage() and "head" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="orthograd.lora"):
        attach_lora(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), LoRAConfig(r=2), seed=0)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("build", [_bert, _gpt2_classifier], ids=["bert", "gpt2"])
def test_dict_batches_and_model_outputs_run_through_unlearn_with_the_ghost_engine(build):
    model = build()
    result = og.unlearn(
        model,
        DictDataset(8, seed=1),
        DictDataset(16, seed=2),
        test=DictDataset(8, seed=3),
        stop="never",  # the whole budget (random labels: the inferred random rule could hold from the start)
        max_epochs=2,
        device="cpu",
        forget_batch_size=4,
        retain_batch_size=8,
        lr=0.05,
    )
    assert type(result.model) is type(model)
    assert all(row["engine_ghost"] == 1.0 for row in result.history[1:])
    assert {"forget", "retain", "test"} <= set(result.final)
    moved = sum(float((a - b).abs().sum()) for a, b in zip(result.model.parameters(), model.parameters(), strict=True))
    assert moved > 0  # the LoRA adapters on the attention projections trained and were merged


def test_ignored_labels_do_not_count_in_accuracy():
    model = _bert().eval()
    data = DictDataset(6, seed=4)
    data.labels[:3] = -100
    task = get_task("classification")
    loader = torch.utils.data.DataLoader(data, batch_size=6, collate_fn=task.collate_fn())
    batch = next(iter(loader))
    with torch.no_grad():
        predictions = task.logits(model, batch).argmax(dim=-1)
    expected = 100.0 * float((predictions[3:] == batch["labels"][3:]).float().mean())
    assert task.evaluate(model, loader, device=torch.device("cpu")) == pytest.approx(expected)


def _unlearn(forget, retain, **kwargs):
    return og.unlearn(_bert(), forget, retain, max_epochs=1, device="cpu", check_overlap=False, **kwargs)


class Triples(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return torch.randint(1, VOCAB, (LENGTH,)), i % 3, i


class NoLabels(DictDataset):
    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i]}


def test_malformed_batches_say_what_was_expected_and_what_came():
    with pytest.raises(ValueError, match=r"expected an \(inputs, labels\) pair.*3 elements") as info:
        _unlearn(Triples(), Triples())
    assert "(inputs, labels, index)" in str(info.value)
    with pytest.raises(ValueError, match=r"a dict without 'labels': dict\(input_ids"):
        _unlearn(NoLabels(4, seed=1), NoLabels(4, seed=2))
    with pytest.raises(ValueError, match=r"field 'text' is list\[\d+\] of str, not a tensor"):
        _unlearn(DictDataset(4, seed=1, extra={"text": "raw"}), DictDataset(4, seed=2, extra={"text": "raw"}))


def test_model_output_without_logits_is_a_clear_error():
    class NoLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(LENGTH, 3)

        def forward(self, input_ids, attention_mask):
            return {"hidden": self.linear(input_ids.float())}

    with pytest.raises(ValueError, match="'logits' field"):
        og.unlearn(NoLogits(), DictDataset(4, seed=1), DictDataset(4, seed=2), max_epochs=1, device="cpu")


def test_label_key_accepted_and_unequal_lengths_padded():
    items = [
        {"input_ids": [5, 6, 7], "label": 1},
        {"input_ids": torch.tensor([8, 9]), "label": 0},
    ]
    batch = pad_collate(items, pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["label"].tolist() == [1, 0]
    task = get_task("classification")
    assert task.targets(batch).tolist() == [1, 0]
    assert set(task.replace_targets(batch, torch.tensor([2, 2]))) == {"input_ids", "attention_mask", "label"}


def test_llama_rms_norm_gets_a_ghost_rule_and_gated_norms_do_not():
    assert ghost_layers.unsupported_reason(LlamaRMSNorm(8)) is None

    class GatedRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))
            self.variance_epsilon = 1e-6

        def forward(self, hidden, gate):
            return hidden * gate

    GatedRMSNorm.__module__ = "transformers.models.fake.modeling_fake"
    GatedRMSNorm.__name__ = "FakeGatedRMSNorm"
    assert "no ghost rule" in ghost_layers.unsupported_reason(GatedRMSNorm())


def test_custom_task_example_in_the_docs_runs():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "custom_task.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/custom_task.md", "exec"), namespace)  # noqa: S102 - the docs example, run as written
    result = namespace["result"]
    assert result.history[0]["forget"] > 0 and result.final["epoch"] == 2
    assert get_task("regression").metric == "rmse"


def test_padded_sequences_of_unequal_length_classify_as_they_do_alone():
    model = _gpt2_classifier().eval()
    items = [{"input_ids": torch.randint(1, VOCAB, (n,)), "labels": torch.tensor(n % 3)} for n in (3, 6, 4)]
    task = ClassificationTask(pad_token_id=model.config.pad_token_id)
    batch = task.collate_fn()(items)
    with torch.no_grad():
        together = task.logits(model, batch)
        alone = torch.cat([model(input_ids=item["input_ids"][None]).logits for item in items])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
