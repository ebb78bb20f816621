"""A missing or mismatched checkpoint gets a clear error, and loading never writes to the checkpoint."""

import pytest
import torch
from safetensors.torch import save_file

from orthograd.bench.config import ConfigError
from orthograd.image_bench.models import load_weights
from orthograd.models import SmallCNN


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_weights(SmallCNN(), tmp_path / "nope.safetensors")


def test_mismatched_checkpoint_names_the_fix_and_is_left_untouched(tmp_path):
    path = tmp_path / "wide.safetensors"
    torch.manual_seed(1)
    saved = {k: v.contiguous() for k, v in SmallCNN(width=8).state_dict().items()}
    save_file(saved, str(path))
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="do not fit SmallCNN"):
        load_weights(SmallCNN(width=16), path)
    assert path.read_bytes() == before
    torch.manual_seed(2)  # a fresh model with other weights: loading must replace every one of them
    model = SmallCNN(width=8)
    assert not torch.equal(model.head[2].weight, saved["head.2.weight"])
    load_weights(model, path)
    assert path.read_bytes() == before
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name
