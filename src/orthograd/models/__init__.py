"""Small reference networks for CPU benchmarks and tests."""

from orthograd.models.small_cnn import SmallCNN

__all__ = ["SmallCNN"]
