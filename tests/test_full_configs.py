"""The real-size Fashion-MNIST benchmark's configs (issue 21, item 4) load, follow the protocol and build their
ResNet-18 without training anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orthograd.bench.experiments import load_experiment
from orthograd.bench.protocol import grid_size, trials
from orthograd.image_bench.models import build_model
from orthograd.models import ResNet18

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "orthograd" / "configs"
FASHION_MNIST_TRAIN = 60_000
UNTUNED = {"finetune", "orthograd"}  # the reference row and the tuning-free default
TRIALS = 6  # validation trials per tuned method: the configs' headers say why not the issue's 12


@pytest.mark.parametrize("kind", ["random", "class"])
def test_full_fashion_mnist_config_is_the_real_size_protocol(kind: str) -> None:
    (config,), _ = load_experiment(CONFIGS / f"fashion_mnist_full_{kind}.yaml")
    training = FASHION_MNIST_TRAIN - config.data.validation_size
    assert config.data.name == "fashion_mnist" and config.data.train_size is None and config.data.test_size is None
    scenario = config.scenario
    assert scenario.kind == kind and scenario.retrain and config.protocol.privacy and config.protocol.stop
    if kind == "random":
        assert scenario.forget_size == training // 10 and len(config.protocol.seeds) >= 5
    else:
        assert len(scenario.classes) >= 5
    assert all(0.01 * training <= size <= 0.05 * training for size in scenario.retain_size)
    protocol = config.protocol
    assert protocol.eval_every is None and protocol.checks_per_epoch == 4 and protocol.track == "stop"
    # the budget is optimizer steps, the same for every method (no epoch cap under it)
    assert protocol.max_steps is not None and protocol.max_epochs is None
    tuned = set(config.methods) - UNTUNED
    assert {row.label for row in config.gridded()} == tuned and len(tuned) == 8
    size = max(grid_size(row.grid) for row in config.gridded())
    assert size == TRIALS
    assert all(len(trials(row.grid, size=size, seed=row.label)) == TRIALS for row in config.gridded())
    assert config.tuning.extend_edges


def test_the_two_full_configs_share_their_original_and_each_runs_on_one_core() -> None:
    """Run side by side (the configs' command), each config trains its references and runs its jobs on one core,
    and both read the one original model from the shared cache."""
    (random,), _ = load_experiment(CONFIGS / "fashion_mnist_full_random.yaml")
    (klass,), _ = load_experiment(CONFIGS / "fashion_mnist_full_class.yaml")
    assert random.original_hash() == klass.original_hash() and random.model_cache() == klass.model_cache()
    assert all(c.workers == 1 and c.threads_per_worker == 1 for c in (random, klass))
    assert random.protocol.model_dump(exclude={"seeds"}) == klass.protocol.model_dump(exclude={"seeds"})


@pytest.mark.parametrize("kind", ["random", "class"])
def test_full_config_builds_a_cifar_stem_resnet18_of_its_width(kind: str) -> None:
    (config,), _ = load_experiment(CONFIGS / f"fashion_mnist_full_{kind}.yaml")
    model = build_model(config.model, num_classes=10, in_channels=1, image_size=28)
    assert isinstance(model, ResNet18) and config.model.stem == "cifar"
    assert model.conv1.out_channels == config.model.width and model.conv1.stride == (1, 1)
    assert model.fc.in_features == 8 * config.model.width
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
