"""Image classification data sets from local files: Fashion-MNIST (IDX files; the Debian package's by default),
CIFAR-10 (torchvision's python batches) and ImageNet (or any ImageFolder tree). Nothing is downloaded.

Each loader returns the full training and test sets; a missing folder or file is a ``FileNotFoundError`` naming the
expected layout. Digits, the small built-in set, is ``data.digits``.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format: magic, dims, big-endian sizes, raw bytes), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: Path | None) -> tuple[TensorDataset, TensorDataset]:
    """Fashion-MNIST as ``(images [N,1,28,28] in [0,1], labels)`` train and test datasets."""
    folder = root or FASHION_MNIST_ROOT
    missing = [name for pair in FASHION_MNIST_FILES.values() for name in pair if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder} (missing {missing}). Install the Debian package "
            "'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist, or `make install`), or set the root "
            "(data.root in a benchmark config) to a folder holding train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
        )

    def split(images: str, labels: str) -> TensorDataset:
        x = torch.from_numpy(read_idx(folder / images).astype(np.float32) / 255.0).unsqueeze(1)
        y = torch.from_numpy(read_idx(folder / labels).astype(np.int64))
        return TensorDataset(x, y)

    return split(*FASHION_MNIST_FILES["train"]), split(*FASHION_MNIST_FILES["test"])


def _normalized(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``[N, H, W, C]`` uint8 -> ``[N, C, H, W]`` float, normalized per channel."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def load_cifar10(root: Path, *, verify_checksums: bool) -> tuple[TensorDataset, TensorDataset]:
    """CIFAR-10 from ``root/cifar-10-batches-py`` through torchvision (no download), as normalized tensors.

    ``verify_checksums=False`` skips torchvision's md5 check of the batch files (needed for re-packed or
    generated batches); the files are still parsed by torchvision's own loader.
    """
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    expected = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found under {root}: expected {folder}/ with {', '.join(expected)} (the python version "
            f"of CIFAR-10, as torchvision's CIFAR10(root, download=True) leaves it); missing {missing}"
        )
    cls = CIFAR10 if verify_checksums else _unchecked_cifar10()
    try:
        train, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError as exc:
        raise ValueError(
            f"CIFAR-10 under {root} failed torchvision's integrity check ({exc}); re-extract the archive, or skip the "
            "check (verify_checksums=False; data.verify_checksums: false in a config) for batches you generated"
        ) from exc

    def tensors(ds: Any) -> TensorDataset:  # a torchvision CIFAR10 (untyped): its ``data`` and ``targets``
        x = _normalized(np.asarray(ds.data), CIFAR10_MEAN, CIFAR10_STD)
        return TensorDataset(x, torch.as_tensor(ds.targets, dtype=torch.long))

    return tensors(train), tensors(test)


def _unchecked_cifar10() -> type:
    from torchvision.datasets import CIFAR10

    class UncheckedCIFAR10(CIFAR10):
        """torchvision's CIFAR10 with no md5 sums: its integrity check then only asks that the files exist."""

        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return UncheckedCIFAR10


def load_imagenet(root: Path, *, image_size: int) -> tuple[Dataset, Dataset]:
    """ImageNet (or any ImageFolder tree) from ``root/train/<class>/*`` and ``root/val/<class>/*``.

    Images are resized (shorter side to 8/7 of ``image_size``), center-cropped to ``image_size`` and normalized
    with the ImageNet statistics, as torchvision's pretrained models expect.
    """
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    missing = [sub for sub in ("train", "val") if not (root / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"ImageNet not found under {root}: expected {root}/train/<class name>/<image> and "
            f"{root}/val/<class name>/<image> (torchvision ImageFolder layout, the same class folders in both); "
            f"missing {[str(root / sub) for sub in missing]}"
        )
    transform = transforms.Compose(
        [
            transforms.Resize(round(image_size * 8 / 7)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    train = ImageFolder(str(root / "train"), transform=transform)
    test = ImageFolder(str(root / "val"), transform=transform)
    if train.classes != test.classes:
        raise ValueError(f"{root}/train and {root}/val must hold the same class folders")
    return train, test
