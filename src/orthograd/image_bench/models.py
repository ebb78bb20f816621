"""Benchmark models: SmallCNN for CPUs, ResNet18 (CIFAR or ImageNet stem, any base width) and ViT-B/16 for GPUs.

Pretrained weights come from a local file (``model.weights``: a state dict saved with ``torch.save`` or
safetensors), read by ``model_folder.load_state`` as a user's own weights are; nothing is downloaded. A checkpoint
that does not fit the architecture is a clear error.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from orthograd.bench.config import ConfigError
from orthograd.image_bench.config import ResNet18Config, SmallCNNConfig, ViTConfig
from orthograd.model_folder import load_state
from orthograd.models import ResNet18, SmallCNN


def build_model(
    config: SmallCNNConfig | ResNet18Config | ViTConfig, *, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    """A freshly initialised model for the config (with ``config.weights`` loaded when given)."""
    if isinstance(config, SmallCNNConfig):
        model: nn.Module = SmallCNN(in_channels=in_channels, num_classes=num_classes, width=config.width,
                                    norm=config.norm)
    elif isinstance(config, ResNet18Config):
        model = ResNet18(num_classes=num_classes, in_channels=in_channels, width=config.width, stem=config.stem)
    else:
        model = _vit(config, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if config.weights is not None:
        load_weights(model, config.weights)
    return model


def _vit(config: ViTConfig, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    if in_channels != 3:
        raise ConfigError(f"vit_b_16 takes 3-channel images; this dataset has {in_channels} channel(s)")
    if image_size % config.patch_size:
        raise ConfigError(f"image size {image_size} is not a multiple of model.patch_size {config.patch_size}")
    return VisionTransformer(
        image_size=image_size,
        patch_size=config.patch_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        hidden_dim=config.hidden_dim,
        mlp_dim=config.mlp_dim,
        num_classes=num_classes,
    )


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a checkpoint into ``model`` strictly (every key present, every shape equal: ``model_folder.load_state``),
    with the config's settings named in the error."""
    if not path.is_file():
        raise ConfigError(f"model.weights {str(path)!r} does not exist")
    try:
        load_state(model, path)
    except ValueError as exc:
        raise ConfigError(
            f"the weights in {path} do not fit {type(model).__name__} with this config ({exc}). Check model.arch, "
            "model.stem and the number of classes of the dataset"
        ) from exc
