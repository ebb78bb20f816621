import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthograd as og
from orthograd.grads import PerSampleGradError, per_sample_grads, per_sample_grads_losses_and_engine
from orthograd.lora import LoRAConfig, attach_lora
from orthograd.models import SmallCNN


def ce_per_sample(model, batch):
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels, reduction="none")


def loop_reference(model, batch, names):
    """Ground truth: one backward per sample (batch size 1), BatchNorm in eval mode."""
    model.eval()
    params = dict(model.named_parameters())
    rows = []
    for i in range(batch[0].shape[0]):
        loss = ce_per_sample(model, (batch[0][i : i + 1], batch[1][i : i + 1]))[0]
        rows.append(torch.autograd.grad(loss, [params[n] for n in names]))
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}


class TinyTransformer(nn.Module):
    """Embedding + one encoder layer + mean pooling: a sequence model with attention and LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.encoder = nn.TransformerEncoderLayer(
            d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def _models():
    torch.manual_seed(0)
    images = (torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,)))
    yield "mlp", nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)), images
    yield "cnn_groupnorm", SmallCNN(width=8, norm="group"), images
    bn = SmallCNN(width=8, norm="batch")
    bn.train()
    bn(torch.randn(16, 1, 8, 8))  # non-trivial running statistics
    yield "cnn_batchnorm_eval", bn, images
    yield "cnn_lora", attach_lora(SmallCNN(width=8), LoRAConfig(r=2), seed=0), images
    yield "transformer", TinyTransformer(), (torch.randint(0, 20, (4, 7)), torch.randint(0, 3, (4,)))


@pytest.mark.parametrize("name,model,batch", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("engine", ["vmap", "loop"])
def test_per_sample_grads_equal_batch_size_one_loop(name, model, batch, engine):
    if name == "cnn_lora":  # make B non-zero so that the A factors get gradients too
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = loop_reference(model, batch, names)
    model.train()
    got = per_sample_grads(model, ce_per_sample, batch, engine=engine, chunk_size=2)
    assert set(got) == set(names)
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6)
    if name == "cnn_batchnorm_eval":
        assert model.training and all(m.training for m in model.modules())  # modes restored


def test_restricted_to_chosen_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    batch = (torch.randn(3, 4), torch.randint(0, 2, (3,)))
    got = per_sample_grads(model, ce_per_sample, batch, params=["1.weight"])
    assert list(got) == ["1.weight"] and got["1.weight"].shape == (3, 2, 3)
    with pytest.raises(KeyError, match="not in the model"):
        per_sample_grads(model, ce_per_sample, batch, params=["2.weight"])


class DataDependentBranch(nn.Module):
    """A forward that vmap cannot batch (Python control flow on tensor values)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        out = self.linear(x)
        return out * 2 if bool(out.sum() > 0) else out


def test_vmap_failure_is_explained_and_vmap_or_loop_falls_back():
    model = DataDependentBranch()
    batch = (torch.randn(3, 4), torch.randint(0, 2, (3,)))
    with pytest.raises(PerSampleGradError, match="engine='loop'"):
        per_sample_grads(model, ce_per_sample, batch, engine="vmap")
    got, _, ran = per_sample_grads_losses_and_engine(model, ce_per_sample, batch, engine="vmap_or_loop")
    expected = per_sample_grads(model, ce_per_sample, batch, engine="loop")
    torch.testing.assert_close(got["linear.weight"], expected["linear.weight"])
    assert ran == "loop"
    assert per_sample_grads_losses_and_engine(nn.Linear(4, 2), ce_per_sample, batch, engine="vmap_or_loop")[2] == "vmap"


def test_an_unknown_engine_is_refused_with_the_choices():
    batch = (torch.randn(3, 4), torch.randint(0, 2, (3,)))
    with pytest.raises(ValueError, match="engine must be one of .*'vmap_or_loop'.*got 'auto'"):
        per_sample_grads(nn.Linear(4, 2), ce_per_sample, batch, engine="auto")


def test_public_alias():
    assert og.per_sample_grads is per_sample_grads


class _DataDependent(torch.nn.Module):
    """Branches on a tensor's value: vmap refuses, the batch-size-1 loop does not."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 2.0 if bool(x.sum() > -1e9) else self.linear(x)


def test_the_loop_fallback_is_logged_once_with_its_reason(caplog) -> None:
    import logging

    from orthograd.grads import per_sample_grads_and_losses

    model, gen = _DataDependent(), torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 3, generator=gen), torch.tensor([0, 1, 0, 1]))

    def loss(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    with caplog.at_level(logging.WARNING, logger="orthograd.grads.functorch"):
        for _ in range(3):
            grads, _ = per_sample_grads_and_losses(model, loss, batch)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "vmap cannot handle _DataDependent (" in warnings[0]
    assert grads["linear.weight"].shape == (4, 2, 3)
