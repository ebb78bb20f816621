"""Bad input gets a clear error before anything runs; the audit record says what was forgotten and how."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import orthograd as og
from orthograd.audit import load_weights
from orthograd.data import class_forgetting_split
from orthograd.data.splits import labels_of
from orthograd.input_checks import check_disjoint, fingerprint
from orthograd.models import SmallCNN


def _split(train, forget_class=2):
    return class_forgetting_split(labels_of(train), forget_class=forget_class, retain_size=100, seed=0).datasets(train)


def test_overlap_by_index_and_by_content_names_positions(digits, digits_model):
    train, _ = digits
    forget, retain = _split(train)
    overlapping = Subset(train, list(retain.indices) + list(forget.indices[:3]))
    message = r"overlap: 3 shared samples \(same dataset index\): forget\[0\] = retain\[100\], forget\[1\] = "
    with pytest.raises(ValueError, match=message):
        og.unlearn(digits_model, forget, overlapping)
    picked = [forget.indices[3], forget.indices[1]]
    copied = TensorDataset(*(t[picked].clone() for t in train.tensors))  # same samples, new tensors
    message = r"2 shared identical samples: forget\[1\] = retain\[1\], forget\[0\] = retain\[3\]\."
    with pytest.raises(ValueError, match=message):
        check_disjoint(copied, Subset(train, list(forget.indices[:5])))
    check_disjoint(forget, retain)  # disjoint splits pass


def _with_value(dataset: TensorDataset, position: int, value: float) -> TensorDataset:
    inputs = dataset.tensors[0].clone()
    inputs[position].view(-1)[5] = value
    return TensorDataset(inputs, dataset.tensors[1])


class _ListDataset(torch.utils.data.Dataset):
    """Samples read one by one (the path for datasets that are not TensorDatasets)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def test_nan_or_inf_inputs_are_refused_with_the_set_and_position(digits, digits_model):
    train, _ = digits
    forget, retain = _split(train)
    forget_data = TensorDataset(*(t[forget.indices] for t in train.tensors))
    with pytest.raises(ValueError, match="sample 7 of the forget set holds NaN or inf values; drop or repair it"):
        og.unlearn(digits_model, _with_value(forget_data, 7, float("nan")), retain)
    poisoned_train = _with_value(train, int(retain.indices[42]), float("inf"))
    with pytest.raises(ValueError, match="sample 42 of the retain set holds NaN or inf"):  # a Subset: its position
        og.unlearn(digits_model, forget, DataLoader(Subset(poisoned_train, retain.indices), batch_size=16))
    samples = [forget_data[i] for i in range(len(forget_data))]
    samples[3] = (samples[3][0] * float("nan"), samples[3][1])
    with pytest.raises(ValueError, match="sample 3 of the forget set holds NaN"):
        og.unlearn(digits_model, _ListDataset(samples), retain)
    with pytest.raises(ValueError, match="sample 7 of the forget set holds NaN"):  # no overlap check: still refused
        og.unlearn(digits_model, _with_value(forget_data, 7, float("nan")), retain, check_overlap=False)


@pytest.mark.parametrize("model", [None, "model.pt", {"weights": 1}])
def test_a_model_that_is_not_a_module_is_a_type_error_naming_the_fix(digits, model):
    train, _ = digits
    forget, retain = _split(train)
    expected = rf"model must be a torch.nn.Module \(the network itself\), got {type(model).__name__}; "
    with pytest.raises(TypeError, match=expected):
        og.unlearn(model, forget, retain)


def test_labels_outside_model_outputs_and_absent_class(digits, digits_model):
    train, _ = digits
    forget, retain = _split(train)
    x = train.tensors[0]
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
    for a, b in zip(restored.parameters(), result.model.parameters(), strict=True):
        assert torch.equal(a, b)
    before = weights.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        result.save(weights)
    assert weights.read_bytes() == before  # the existing file is untouched
    other = og.unlearn(digits_model, forget, retain, max_epochs=1, lr=1e-2, seed=5)
    assert other.save(weights, overwrite=True) == (weights, sidecar)
    replaced = load_weights(SmallCNN(), weights)
    for a, b in zip(replaced.parameters(), other.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert weights.read_bytes() != before and json.loads(sidecar.read_text())["seed"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_every_results_record_names_seed_split_and_versions(digits, digits_model):
    from orthograd.image_bench.experiment import run_record

    train, test = digits
    forget, retain = _split(train)
    result = og.unlearn(digits_model, forget, retain, test=test, max_epochs=1, lr=1e-3, seed=7)
    record = run_record(result, scenario="class", seed=7, forget_class=2)
    assert record["seed"] == 7 and record["forget_class"] == 2
    assert record["data"]["forget"] == fingerprint(forget) and record["data"]["retain"] == fingerprint(retain)
    # the provenance of the shared protocol names transformers and peft too (None where not installed)
    assert {k: record["versions"][k] for k in ("orthograd", "torch")} == {"orthograd": og.__version__,
                                                                         "torch": torch.__version__}
    assert set(record["versions"]) == {"orthograd", "torch", "transformers", "peft"}
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


def test_fingerprints_tell_different_data_apart(digits):
    train, _ = digits
    x, y = train.tensors
    base = TensorDataset(x[:50].clone(), y[:50].clone())
    assert fingerprint(base) == fingerprint(TensorDataset(x[:50].clone(), y[:50].clone()))  # content, not identity
    for other in (_with_value(base, 20, 0.123), TensorDataset(x[:50], y[:50].roll(1)), TensorDataset(x[1:51], y[1:51])):
        assert fingerprint(other)["content_hash"] != fingerprint(base)["content_hash"]
    edited = _with_value(base, 3, 0.5)
    view, edited_view = Subset(base, [1, 3, 5]), Subset(edited, [1, 3, 5])
    assert fingerprint(view)["ids_hash"] == fingerprint(edited_view)["ids_hash"]  # same indices...
    assert fingerprint(view)["content_hash"] != fingerprint(edited_view)["content_hash"]  # ...into other data
    assert fingerprint(Subset(base, [3, 1, 5]))["ids_hash"] != fingerprint(view)["ids_hash"]
    copy = TensorDataset(x[[1, 3, 5]].clone(), y[[1, 3, 5]].clone())
    assert fingerprint(view)["content_hash"] == fingerprint(copy)["content_hash"]
    assert "ids_hash" not in fingerprint(copy) and fingerprint(view)["size"] == 3
