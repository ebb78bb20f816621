"""A missing or mismatched checkpoint gets a clear error, and loading never writes to the checkpoint."""

import pytest
import torch
from safetensors.torch import save_file

from orthograd.bench.config import ConfigError
from orthograd.bench.models import load_weights
from orthograd.models import SmallCNN


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_weights(SmallCNN(), tmp_path / "nope.safetensors")


def test_mismatched_checkpoint_names_the_fix_and_is_left_untouched(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in SmallCNN(width=8).state_dict().items()}, str(path))
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="do not fit SmallCNN"):
        load_weights(SmallCNN(width=16), path)
    assert path.read_bytes() == before
    model = SmallCNN(width=8)
    load_weights(model, path)
    assert path.read_bytes() == before
    assert all(torch.isfinite(p).all() for p in model.parameters())
