"""Property tests over splits and configs, and a long run whose memory stays flat."""


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import orthograd as og
from orthograd.data import class_forgetting_split, random_forgetting_split
from orthograd.methods import make_config
from orthograd.methods.orthograd.config import OrthoGradConfig


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=300),
    classes=st.integers(min_value=1, max_value=12),
    forget_frac=st.floats(min_value=0.0, max_value=1.0),
    retain_frac=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_random_split_sizes_are_exact_and_disjoint(n, classes, forget_frac, retain_frac, seed):
    labels = np.arange(n) % classes
    forget_size = max(1, min(n - 1, int(forget_frac * n)))
    retain_size = max(1, int(retain_frac * (n - forget_size)))
    split = random_forgetting_split(labels, forget_size=forget_size, retain_size=retain_size, seed=seed)
    assert len(split.forget) == forget_size and len(split.retain) == retain_size
    assert len(np.intersect1d(split.forget, split.retain)) == 0
    assert split.forget.max() < n and split.retain.max() < n
    with pytest.raises(ValueError):
        random_forgetting_split(labels, forget_size=forget_size, retain_size=n, seed=seed)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=3, max_value=200), classes=st.integers(min_value=2, max_value=8), seed=st.integers(0, 1000)
)
def test_class_split_forgets_exactly_one_class(n, classes, seed):
    labels = np.arange(n) % classes
    forget_class = seed % min(classes, n)
    split = class_forgetting_split(labels, forget_class=forget_class, retain_size=None, seed=seed)
    assert set(labels[split.forget].tolist()) == {forget_class}
    assert forget_class not in set(labels[split.retain].tolist())
    assert len(split.forget) + len(split.retain) == n


@settings(max_examples=60, deadline=None)
@given(
    alpha=st.one_of(st.floats(min_value=-1.0, max_value=2.0), st.sampled_from([0.0, 1.0, float("nan")])),
    lr=st.one_of(st.floats(min_value=-1.0, max_value=1.0), st.just(float("nan"))),
    batch=st.integers(min_value=-4, max_value=512),
)
def test_orthograd_config_accepts_exactly_the_valid_values(alpha, lr, batch):
    # the fixed schedule takes alpha = 0 (pure orthogonal ascent); the adaptive one starts from a share in (0, 1)
    for schedule, lowest_ok in (("fixed", alpha >= 0.0), ("adaptive", alpha > 0.0)):
        valid = lowest_ok and alpha < 1.0 and lr > 0 and batch > 0
        hyper = {"schedule": schedule, "alpha": alpha, "lr": lr, "retain_batch_size": batch}
        if valid:
            cfg = make_config("orthograd", hyper)
            assert OrthoGradConfig.from_dict(cfg.to_dict()) == cfg
        else:
            with pytest.raises(ValueError):
                make_config("orthograd", hyper)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def test_long_run_memory_stays_flat():
    """600 OrthoGrad steps: resident memory after the warm-up does not grow with the number of steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 4))
    forget = TensorDataset(torch.randn(64, 32), torch.randint(0, 4, (64,)))
    retain = TensorDataset(torch.randn(64, 32), torch.randint(0, 4, (64,)))
    marks = {}

    def measure(row):
        marks[row["step"]] = _rss_bytes()

    og.unlearn(model, forget, retain, lora=None, lr=1e-4, max_epochs=300, forget_batch_size=32,
               retain_batch_size=32, eval_every=100, on_eval=measure)
    growth = marks[600] - marks[200]
    # a leak of one [32 x 9.3k] per-sample gradient matrix per step would add ~480 MB over 400 steps
    assert growth < 24 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB between step 200 and 600"
