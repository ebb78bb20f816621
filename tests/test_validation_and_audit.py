"""Bad input gets a clear error before anything runs; the audit record says what was forgotten and how."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

import orthograd as og
from orthograd.audit import load_weights
from orthograd.data import class_forgetting_split
from orthograd.data.splits import labels_of
from orthograd.models import SmallCNN
from orthograd.validation import check_disjoint, fingerprint


def _split(train, forget_class=2):
    return class_forgetting_split(labels_of(train), forget_class=forget_class, retain_size=100, seed=0).datasets(train)


def test_overlap_by_index_and_by_content(digits, digits_model):
    train, _ = digits
    forget, retain = _split(train)
    overlapping = Subset(train, list(retain.indices) + list(forget.indices[:3]))
    with pytest.raises(ValueError, match="overlap: 3 shared indices"):
        og.unlearn(digits_model, forget, overlapping)
    copied = TensorDataset(*(t[forget.indices[:2]].clone() for t in train.tensors))  # same samples, new tensors
    with pytest.raises(ValueError, match="overlap: 2 shared identical samples"):
        check_disjoint(copied, Subset(train, list(forget.indices[:5])))
    check_disjoint(forget, retain)  # disjoint splits pass


def test_labels_outside_model_outputs_and_absent_class(digits, digits_model):
    train, _ = digits
    forget, retain = _split(train)
    x, y = train.tensors
    bad = TensorDataset(x[:20].clone(), torch.full((20,), 12))
    with pytest.raises(ValueError, match=r"labels \[12\] outside the model's 10 outputs"):
        og.unlearn(digits_model, bad, retain)
    with pytest.raises(ValueError, match=r"forget_classes \[5\] do not occur"):
        og.unlearn(digits_model, forget, retain, forget_classes=[5])


def test_wrong_input_shape_and_nothing_trainable(digits, digits_model):
    train, _ = digits
    forget, retain = _split(train)
    wrong = TensorDataset(torch.randn(10, 3, 8, 8), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="could not process a sample"):
        og.unlearn(digits_model, wrong, retain)
    with pytest.raises(ValueError, match="no trainable parameters"):
        og.unlearn(nn.Sequential(nn.Flatten(), nn.Identity()), forget, retain, lora=None)


def test_saved_model_and_audit_sidecar(tmp_path, digits, digits_model):
    train, test = digits
    forget, retain = _split(train)
    result = og.unlearn(digits_model, forget, retain, test=test, max_epochs=1, lr=1e-3, seed=4)
    weights, sidecar = result.save(tmp_path / "unlearned.safetensors")
    record = json.loads(sidecar.read_text())
    assert record["method"] == "orthograd" and record["seed"] == 4
    assert record["data"]["forget"] == fingerprint(forget) and record["data"]["forget"]["size"] == len(forget)
    assert record["metrics"]["before"]["forget"] == result.original["forget"]
    assert record["metrics"]["after"]["forget"] == result.final["forget"]
    assert record["versions"]["torch"] == torch.__version__
    restored = load_weights(SmallCNN(), weights)
    for a, b in zip(restored.parameters(), result.model.parameters()):
        assert torch.equal(a, b)
    before = weights.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        result.save(weights)
    assert weights.read_bytes() == before  # the existing file is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_every_results_record_names_seed_split_and_versions(digits, digits_model):
    from orthograd.reporting import run_record

    train, test = digits
    forget, retain = _split(train)
    result = og.unlearn(digits_model, forget, retain, test=test, max_epochs=1, lr=1e-3, seed=7)
    record = run_record(result, scenario="class", seed=7, forget_class=2)
    assert record["seed"] == 7 and record["forget_class"] == 2
    assert record["data"]["forget"] == fingerprint(forget) and record["data"]["retain"] == fingerprint(retain)
    assert record["versions"] == {"orthograd": og.__version__, "torch": torch.__version__}
    json.dumps(record)  # the record is plain JSON



def test_overlap_check_and_fingerprints_read_each_sample_once(digits):
    train, _ = digits
    forget, retain = _split(train)

    class CountingDataset(torch.utils.data.Dataset):
        """A dataset that counts item reads (standing in for one that decodes files per item)."""

        def __init__(self, base):
            self.base, self.reads = base, 0

        def __len__(self):
            return len(self.base)

        def __getitem__(self, index):
            self.reads += 1
            return self.base[index]

    uncached, cached = CountingDataset(forget), CountingDataset(forget)
    check_disjoint(uncached, retain)
    fingerprint(uncached)
    assert uncached.reads == 2 * len(forget)
    cache: dict = {}
    check_disjoint(cached, retain, cache=cache)
    assert fingerprint(cached, cache=cache) == fingerprint(uncached)
    assert cached.reads == len(forget)  # the overlap check and the fingerprint share one read of each sample
