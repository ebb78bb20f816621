"""Reference networks for benchmarks and tests."""

from orthograd.models.resnet import ResNet18
from orthograd.models.small_cnn import SmallCNN

__all__ = ["ResNet18", "SmallCNN"]
