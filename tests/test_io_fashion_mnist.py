"""The Fashion-MNIST loader: IDX files (gzipped or not) read exactly, and the Debian package's real data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from orthograd.data.images import FASHION_MNIST_FILES, FASHION_MNIST_ROOT, load_fashion_mnist, read_idx


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(folder: Path, *, train: int, test: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for split, count in (("train", train), ("test", test)):
        images, labels = FASHION_MNIST_FILES[split]
        arrays[images] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        arrays[labels] = rng.integers(0, 10, count, dtype=np.uint8)
    for name, array in arrays.items():
        (folder / name).write_bytes(gzip.compress(_idx(array)))
    return arrays


@pytest.mark.parametrize("compressed", [True, False])
def test_read_idx_round_trips(tmp_path: Path, compressed: bool) -> None:
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = tmp_path / ("a.idx.gz" if compressed else "a.idx")
    path.write_bytes(gzip.compress(_idx(array)) if compressed else _idx(array))
    np.testing.assert_array_equal(read_idx(path), array)
    (tmp_path / "bad.idx").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)  # float IDX: refused
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        read_idx(tmp_path / "bad.idx")


def test_loader_scales_pixels_and_keeps_labels(tmp_path: Path) -> None:
    arrays = _write(tmp_path, train=7, test=3)
    train, test = load_fashion_mnist(tmp_path)
    images, labels = train.tensors
    assert images.shape == (7, 1, 28, 28) and images.dtype == torch.float32 and labels.dtype == torch.int64
    np.testing.assert_allclose(images[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"] / 255.0, rtol=1e-6)
    assert labels.tolist() == arrays["train-labels-idx1-ubyte.gz"].tolist()
    assert len(test) == 3 and test.tensors[1].tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_the_debian_package_gives_the_real_data_set() -> None:
    train, test = load_fashion_mnist(None)
    assert len(train) == 60_000 and len(test) == 10_000
    for dataset, per_class in ((train, 6_000), (test, 1_000)):
        images, labels = dataset.tensors
        assert torch.bincount(labels).tolist() == [per_class] * 10
        assert images.shape[1:] == (1, 28, 28) and float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert 0.25 < float(train.tensors[0].mean()) < 0.35  # Fashion-MNIST's mean pixel is about 0.286
