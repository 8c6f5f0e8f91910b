"""Small data sets written in the real on-disk formats torchvision reads (no download needed).

The checksums torchvision compares are those of the real archives, which small files cannot match;
tests that read these files patch the integrity check with :func:`skip_integrity_checks`.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an uint8 array in MNIST's IDX format (magic 0x0000 08 <ndim>, big-endian dims, data)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist_full(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """torchvision's MNIST layout: ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


def write_cifar(root: Path, hundred: bool = False, n_per_batch: int = 20, n_test: int = 20, seed: int = 0) -> Path:
    """CIFAR's python pickles: ``cifar-10-batches-py/data_batch_{1..5}, test_batch, batches.meta``."""
    rng = np.random.default_rng(seed)
    n_classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    key = "fine_labels" if hundred else "labels"

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(np.arange(n) % n_classes)}

    if hundred:
        files = {"train": batch(5 * n_per_batch), "test": batch(n_test)}
        meta = {"fine_label_names": [f"class{i}" for i in range(100)]}
        meta_name = "meta"
    else:
        files = {f"data_batch_{i}": batch(n_per_batch) for i in range(1, 6)} | {"test_batch": batch(n_test)}
        meta = {"label_names": [f"class{i}" for i in range(10)]}
        meta_name = "batches.meta"
    for name, obj in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f)
    return root


def write_svhn(root: Path, n: int = 40, splits=("train", "test", "extra"), seed: int = 0) -> Path:
    """SVHN's MATLAB files: ``X`` is 32x32x3xN uint8, ``y`` is Nx1 with labels 1..10 (10 means digit 0)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split in splits:
        savemat(str(root / f"{split}_32x32.mat"), {
            "X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
            "y": (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8),
        })
    return root


def write_image_folder(root: Path, classes: int = 3, per_class: int = 6, size: int = 40, seed: int = 0) -> Path:
    """ImageNet's layout: ``root/{train,val}/<wnid>/*.JPEG``."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(d / f"img_{i}.JPEG")
    return root


@pytest.fixture
def skip_integrity_checks(monkeypatch):
    """Accept small files where torchvision checks the md5 of the real archives."""
    from torchvision import datasets
    from torchvision.datasets import cifar

    for cls in (datasets.CIFAR10, datasets.CIFAR100, datasets.SVHN):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # CIFAR's meta file
