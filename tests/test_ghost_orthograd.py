"""OrthoGrad on the ghost engine: the same update direction as the reference path (torch.func + QR), the engine
choice and its fallback visible in the log and the history, and the configuration's guards."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.models import VisionTransformer

import orthograd as og
from orthograd.grads import headroom
from orthograd.lora import LoRAConfig, attach_lora
from orthograd.methods import MethodContext, make_config
from orthograd.methods.orthograd import gradients as orthograd_gradients
from orthograd.models import ResNet18, SmallCNN
from orthograd.tasks import ClassificationTask

RETAIN, FORGET = 6, 4


class _ResidualNet(nn.Module):
    """A ResNet-style block: conv, BatchNorm, in-place ReLU and an in-place residual sum (full backward hooks fail)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 10)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.relu(self.bn1(self.stem(x)))
        out = self.bn2(self.conv(identity))
        out += identity
        return self.fc(self.relu(out).mean(dim=(2, 3)))


class _TokenNet(nn.Module):
    """Embedding, LayerNorm and linear layers on token sequences; the 8x8 'image' is read as 8 tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = (x.reshape(x.shape[0], 8, 8).sum(dim=2).abs() * 3).long().clamp(max=15)
        return self.fc(torch.tanh(self.proj(self.norm(self.embed(tokens)))).mean(dim=1))


class _RawScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * self.scale


def _lora_cnn() -> nn.Module:
    model = attach_lora(SmallCNN(width=4), LoRAConfig(r=2), seed=0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the test see every factor
            param.data.normal_(std=0.2)
    return model


class _GreyViT(nn.Module):
    """A tiny torchvision ViT on the 1-channel 8x8 test images (the channel repeated)."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = _tiny_vit(image_size=8, patch_size=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x.expand(-1, 3, -1, -1))


def _tiny_vit(*, image_size: int, patch_size: int) -> VisionTransformer:
    vit = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=2, num_heads=2, hidden_dim=32,
                            mlp_dim=64, num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.2)  # torchvision starts the head at zero
    return vit


def _lora_vit() -> nn.Module:
    model = attach_lora(_GreyViT(), LoRAConfig(r=2), seed=0)  # default targets: the nn.MultiheadAttention modules
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.2)
    return model


MODELS = {
    "cnn_groupnorm": lambda: SmallCNN(width=4),
    "cnn_batchnorm": lambda: SmallCNN(width=4, norm="batch"),
    "residual_inplace": _ResidualNet,
    "resnet18_narrow": lambda: ResNet18(in_channels=1, width=4, stem="cifar"),
    "tokens": _TokenNet,
    "cnn_lora": _lora_cnn,
    "vit_lora_attention": _lora_vit,
}


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _method(model: nn.Module, **hyper):
    config = make_config("orthograd", {"lora": None, "schedule": "fixed", **hyper})  # Algorithm 1's direction
    context = MethodContext(
        model=model,
        task=ClassificationTask(),
        forget=_data(FORGET, 1),
        retain=_data(RETAIN, 2),
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    return og.methods.get("orthograd")(config, context)


def _direction(model: nn.Module, **hyper) -> tuple[torch.Tensor, dict[str, float]]:
    method = _method(model, alpha=0.3, **hyper)
    direction, stats = method.update_direction(_data(FORGET, 1).tensors, _data(RETAIN, 2).tensors)
    return torch.cat([direction[n].reshape(-1) for n in method.params]).double(), stats


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ghost_direction_equals_vmap_qr_reference(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()  # as the runner sets it (OrthoGrad.train_mode is False)
    reference, ref_stats = _direction(model, engine="vmap", projection="qr")
    for chunk_size, fuse_passes in ((None, False), (4, False), (None, True)):
        ghost, stats = _direction(model, engine="ghost", chunk_size=chunk_size, fuse_passes=fuse_passes)
        assert stats["engine_ghost"] == 1.0 and ref_stats["engine_ghost"] == 0.0
        assert _relative(ghost, reference) <= 1e-5
        assert stats["kept_fraction"] == pytest.approx(ref_stats["kept_fraction"], rel=1e-5)
        assert stats["retain_loss"] == pytest.approx(ref_stats["retain_loss"], rel=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_ghost_pass_for_both_batches_gives_the_two_pass_direction(name, monkeypatch):
    """With the model in eval mode the forget batch joins the retain batch's ghost pass: the direction and the
    statistics are those of separate passes (a forget backward, then the retain span), to float32 round-off."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    found = []
    one_pass = orthograd_gradients.ghost_span_and_mean

    def spy(*args, **kwargs):
        found.append(one_pass(*args, **kwargs))
        return found[-1]

    monkeypatch.setattr(orthograd_gradients, "ghost_span_and_mean", spy)
    separate, stats = _direction(model, engine="ghost", fuse_passes=False)
    assert not found
    fused, fused_stats = _direction(model, engine="ghost", fuse_passes=True)
    assert found and found[-1] is not None
    # float32 sums in another order (one backward of both batches' losses): round-off, which thread counts change
    assert _relative(fused, separate) <= 1e-5
    for key in ("forget_loss", "retain_loss", "kept_fraction", "retain_to_forget_norm"):
        assert fused_stats[key] == pytest.approx(stats[key], rel=1e-5)


def test_auto_fuses_the_passes_from_the_second_step_while_free_memory_holds_the_forget_rows(monkeypatch):
    """``fuse_passes="auto"``: the first step runs two passes and measures the captures per sample; later steps
    share one pass while the device's free memory holds the forget rows' estimate, and go back to two when not."""
    torch.manual_seed(0)
    found = []
    one_pass = orthograd_gradients.ghost_span_and_mean
    spy = lambda *args, **kwargs: found.append(1) or one_pass(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(orthograd_gradients, "ghost_span_and_mean", spy)
    method = _method(MODELS["cnn_lora"]().eval(), alpha=0.3, engine="ghost")
    assert method.config.fuse_passes == "auto"
    forget, retain = _data(FORGET, 1).tensors, _data(RETAIN, 2).tensors
    method.update_direction(forget, retain)
    assert not found and method.gradients.row_bytes > 0
    method.update_direction(forget, retain)
    assert len(found) == 1
    need = headroom.ACTIVATIONS_PER_CAPTURE * method.gradients.row_bytes * FORGET
    monkeypatch.setattr(headroom, "available_bytes", lambda device: int(need))  # under the 2x margin
    method.update_direction(forget, retain)
    assert len(found) == 1
    chunked = _method(MODELS["cnn_lora"]().eval(), alpha=0.3, engine="ghost", chunk_size=4)
    monkeypatch.setattr(headroom, "available_bytes", lambda device: 1 << 50)
    for _ in range(2):
        chunked.update_direction(forget, retain)
    assert len(found) == 1  # a chunk size bounds the pass: never fused under "auto"


def test_headroom_reads_the_free_memory_and_refuses_what_does_not_fit():
    free = headroom.available_bytes(torch.device("cpu"))
    assert free is not None and free > 0
    assert headroom.fits(1, torch.device("cpu"))
    assert not headroom.fits(free, torch.device("cpu"))  # the 2x margin
    with pytest.raises(ValueError, match="fuse_passes"):
        make_config("orthograd", {"fuse_passes": "sometimes"})


def test_a_forget_batch_with_ignored_labels_keeps_its_own_pass():
    """Classification's mean loss skips labels of -100 (not the mean of the per-sample losses): no fused pass."""
    x, labels = _data(FORGET, 1).tensors
    task = ClassificationTask()
    assert task.mean_is_mean_of_per_sample((x, labels))
    assert not task.mean_is_mean_of_per_sample((x, torch.where(labels == labels[0], -100, labels)))


def test_orthograd_on_a_torchvision_vit_with_lora_on_attention_uses_the_ghost_engine():
    """The paper's ViT setting (LoRA on nn.MultiheadAttention) never falls to the batch-size-1 loop."""
    torch.manual_seed(0)
    vit, g = _tiny_vit(image_size=32, patch_size=8), torch.Generator().manual_seed(0)
    forget, retain = (
        TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in (8, 16)
    )
    result = og.unlearn(vit, forget, retain, max_epochs=1, lr=1e-2)
    assert result.history[-1]["engine_ghost"] == 1.0
    assert type(result.model) is VisionTransformer
    assert all(type(layer.self_attention) is nn.MultiheadAttention for layer in result.model.encoder.layers)
    assert list(result.model.state_dict()) == list(vit.state_dict())


def test_bf16_autocast_direction_is_close_to_float32():
    """bf16 forward/backward with a float64 solve: within 5% of the float32 direction (8-bit mantissa)."""
    torch.manual_seed(0)
    model = _ResidualNet().eval()
    reference, _ = _direction(model, engine="vmap", projection="qr")
    ghost, _ = _direction(model, engine="ghost", bf16=True)
    assert _relative(ghost, reference) <= 5e-2


def test_auto_falls_back_for_an_unsupported_layer_and_says_so(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(_RawScale(), nn.Linear(64, 10))
    with caplog.at_level(logging.INFO, logger="orthograd.methods.orthograd.gradients"):
        result = og.unlearn(model, _data(FORGET, 1), _data(RETAIN, 2), max_epochs=1, lora=None, lr=1e-2)
    assert "torch.func" in caplog.text and "_RawScale" in caplog.text
    assert result.history[-1]["engine_ghost"] == 0.0
    supported = og.unlearn(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), _data(FORGET, 1), _data(RETAIN, 2),
                           max_epochs=1, lora=None, lr=1e-2)
    assert supported.history[-1]["engine_ghost"] == 1.0


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.layer(torch.tanh(self.layer(x.flatten(1))))))


def test_run_time_refusal_switches_to_the_reference_engine(caplog):
    torch.manual_seed(0)
    model = _Twice()
    reference, _ = _direction(model, engine="vmap", projection="qr")
    with caplog.at_level(logging.WARNING, logger="orthograd.methods.orthograd.gradients"):
        auto, stats = _direction(model)
    assert "ghost engine failed" in caplog.text and stats["engine_ghost"] == 0.0
    assert _relative(auto, reference) <= 1e-5
    with pytest.raises(Exception, match="2 times"):
        _direction(model, engine="ghost")


class _Branching(nn.Module):
    """Python control flow on a tensor's value: vmap refuses it, the batch-size-1 loop does not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1))
        return out * 2 if bool(out.sum() > 0) else out


@pytest.mark.parametrize("model,hyper,chosen,ran", [
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), {}, "ghost", "ghost"),
    (_Twice, {}, "ghost", "vmap"),  # the ghost engine refuses at run time
    (lambda: SmallCNN(width=4), {"projection": "qr"}, "vmap_or_loop", "vmap"),
    (_Branching, {"engine": "vmap_or_loop"}, "vmap_or_loop", "loop"),
    (_Branching, {"engine": "loop"}, "loop", "loop"),
])
def test_engine_names_the_engine_that_ran(model, hyper, chosen, ran):
    """The config's "auto" is ghost, else torch.func's "vmap_or_loop"; ``engine`` then says which engine ran."""
    torch.manual_seed(0)
    method = _method(model(), **hyper)
    assert method.engine == chosen
    method.update_direction(_data(FORGET, 1).tensors, _data(RETAIN, 2).tensors)
    assert method.engine == ran


def test_configuration_guards():
    with pytest.raises(ValueError, match="engine='vmap' for projection='qr'"):
        make_config("orthograd", {"engine": "ghost", "projection": "qr"})
    with pytest.raises(ValueError, match="per_tensor"):
        make_config("orthograd", {"engine": "ghost", "projection_scope": "per_tensor"})
    with pytest.raises(ValueError, match="_RawScale"):
        _method(nn.Sequential(_RawScale(), nn.Linear(64, 10)), engine="ghost")
    assert _method(SmallCNN(width=4), projection="qr").engine != "ghost"  # QR stays the reference path
