"""orthograd's ResNet-18: torchvision's network at width 64, every stage scaled at smaller widths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orthograd.models import ResNet18

torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize("in_channels", [3, 1])
def test_width_64_loads_torchvision_weights_and_gives_its_outputs(in_channels):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None, num_classes=7)
    if in_channels != 3:
        reference.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    ours = ResNet18(num_classes=7, in_channels=in_channels)
    ours.load_state_dict(reference.state_dict())  # strict: every name and shape matches
    x = torch.randn(2, in_channels, 64, 64)
    torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


def test_a_narrow_cifar_stem_network_scales_every_stage_and_keeps_the_resolution():
    model = ResNet18(num_classes=10, in_channels=1, width=16, stem="cifar")
    widths = [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
              model.layer3[0].conv1.out_channels, model.layer4[0].conv1.out_channels]
    assert widths == [16, 32, 64, 128] and model.fc.in_features == 128
    full = sum(p.numel() for p in ResNet18(num_classes=10, in_channels=1, stem="cifar").parameters())
    narrow = sum(p.numel() for p in model.parameters())
    assert 12 < full / narrow < 20  # parameters scale with width squared: (64 / 16)^2 = 16, less the head
    shapes: list[torch.Size] = []
    model.layer1.register_forward_hook(lambda module, args, out: shapes.append(out.shape))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert shapes[0][-2:] == (28, 28)  # the CIFAR stem neither strides nor pools


@pytest.mark.parametrize("bad", [{"width": 0}, {"stem": "tiny"}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match="width|stem"):
        ResNet18(**bad)
