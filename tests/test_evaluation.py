"""The helpers a newcomer's first lines use: og.train_classifier, og.evaluate and og.accuracy(model, data)."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import orthograd as og
from orthograd.models import SmallCNN


def _hand_accuracy(model, dataset):
    inputs, labels = dataset.tensors
    with torch.no_grad():
        return 100.0 * float((model.eval()(inputs).argmax(dim=1) == labels).float().mean())


def test_evaluate_and_accuracy_take_a_model_and_a_dataset_or_loader(digits, digits_model):
    _, test = digits
    model = copy.deepcopy(digits_model).train()
    expected = _hand_accuracy(copy.deepcopy(digits_model), test)
    assert og.evaluate(model, test) == {"accuracy": pytest.approx(expected)}
    assert og.evaluate(model, DataLoader(test, batch_size=7, shuffle=True)) == {"accuracy": pytest.approx(expected)}
    assert og.accuracy(model, test) == pytest.approx(expected)
    assert og.accuracy(model, test, device="cpu") == pytest.approx(expected)
    assert model.training  # the caller's mode is restored
    assert next(model.parameters()).device.type == "cpu"
    with torch.no_grad():
        logits = digits_model(test.tensors[0])
    assert og.accuracy(logits, test.tensors[1]) == pytest.approx(expected)  # the tensor form still works


def test_evaluate_and_accuracy_errors_name_what_is_expected(digits, digits_model):
    _, test = digits
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module \(the network itself\), got NoneType"):
        og.evaluate(None, test)
    with pytest.raises(TypeError, match=r"accuracy takes \(logits, labels\) tensors or \(model, dataset or"):
        og.accuracy(test, digits_model)
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        og.evaluate(digits_model, empty)
    with pytest.raises(ValueError, match="unknown task"):
        og.evaluate(digits_model, test, task="regression")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here; use device='cpu'"):
            og.evaluate(digits_model, test, device="cuda")


def test_train_classifier_trains_a_model_to_unlearn_from(digits):
    train, test = digits
    torch.manual_seed(0)
    model = SmallCNN()
    trained = og.train_classifier(model, train, epochs=3, seed=1, device="cpu")
    assert trained is model and not trained.training
    assert og.accuracy(trained, test) > 90.0  # ~96% after 3 epochs; 10% before
    torch.manual_seed(0)
    again = og.train_classifier(SmallCNN(), train, epochs=3, seed=1, device="cpu")
    for a, b in zip(trained.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)  # seeded
    torch.manual_seed(0)
    other_seed = og.train_classifier(SmallCNN(), train, epochs=3, seed=2, device="cpu")
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), other_seed.parameters(), strict=True))
    loader = DataLoader(train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    sgd = og.train_classifier(SmallCNN(), loader, epochs=3, optimizer="sgd", lr=0.1, device="cpu")
    assert og.accuracy(sgd, test) > 80.0


def test_train_classifier_refuses_bad_settings(digits):
    train, _ = digits
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'sgd', got 'rmsprop'"):
        og.train_classifier(SmallCNN(), train, optimizer="rmsprop")
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        og.train_classifier(SmallCNN(), train, epochs=-1)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module \(the network itself\), got str"):
        og.train_classifier("resnet18", train)
