"""MNIST in torchvision's on-disk format.

Two sources, chosen by what ``data_dir`` holds:

* the 10,000-image test set alone (``t10k-images-idx3-ubyte[.gz]`` and labels, as in
  ``../shared/data/mnist-t10k/``): split deterministically into 7000 train / 1000 val / 2000 test. This
  is how the tests and benchmarks of this project run, where no download works.
* the full data set in torchvision's layout (``<data_dir>/MNIST/raw/``), or ``download=true``: train is
  the 60,000 training images less ``val_size`` held out for calibration; test is the official test set.
"""

from __future__ import annotations

import gzip
import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets
from torchvision.transforms import v2

from experiments.data.base import ClassificationDataModule, split_indices
from gating.errors import UserError

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
T10K_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
T10K_SPLIT = (7000, 1000, 2000)  # train / val / test of the 10k set, fixed for the whole project


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format: big-endian magic, dims, then uint8 data), gzipped or not."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes; is the download complete?")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _check_md5(folder: Path) -> None:
    sums = folder / "MD5SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split()[0], line.split()[-1].lstrip("*")
        f = folder / name
        if f.is_file() and hashlib.md5(f.read_bytes()).hexdigest() != digest:
            raise UserError(f"{f} does not match its md5 in {sums}: the file is corrupt; copy it again")


@lru_cache(maxsize=4)
def load_t10k(data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test set from ``data_dir`` as uint8 images ``[10000, 1, 28, 28]`` and labels."""
    folder = Path(data_dir)
    paths = [_find(folder, s) for s in T10K_FILES]
    if None in paths:
        raise UserError(f"no {T10K_FILES[0]}[.gz] and {T10K_FILES[1]}[.gz] in {folder}")
    _check_md5(folder)
    images = torch.from_numpy(_read_idx(paths[0]).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(paths[1]).astype(np.int64))
    if images.shape[1:] != (1, 28, 28) or len(images) != len(labels):
        raise UserError(f"MNIST files in {folder} have unexpected shapes {tuple(images.shape)}, {tuple(labels.shape)}")
    return images, labels


def has_t10k(data_dir: str | Path) -> bool:
    return all(_find(Path(data_dir), s) is not None for s in T10K_FILES)


class MNISTDataModule(ClassificationDataModule):
    """MNIST from the 10k test set (7000/1000/2000 split) or the full torchvision data set.

    Args:
        data_dir: a folder with the t10k IDX files, or a torchvision root (holding ``MNIST/raw``).
        download: let torchvision download the full data set into ``data_dir``.
        val_size: calibration images held out of the 60k training set (full data set only).
        augment: random shifts of up to 2 pixels on training images.
        **kwargs: see :class:`ClassificationDataModule`.
    """

    def __init__(self, data_dir: str, download: bool = False, val_size: int = 5000, augment: bool = True,
                 **kwargs) -> None:
        kwargs.setdefault("num_classes", 10)
        kwargs.setdefault("in_chans", 1)
        kwargs.setdefault("image_size", 28)
        super().__init__(**kwargs)
        self.data_dir, self.download, self.val_size, self.augment = str(data_dir), download, val_size, augment

    @property
    def source(self) -> str:
        """``"t10k"`` (the 10k set split three ways) or ``"full"`` (torchvision's train/test)."""
        full = (Path(self.data_dir) / "MNIST" / "raw").is_dir()
        return "full" if (self.download or full) else "t10k"

    def _transforms(self):
        norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MNIST_MEAN, MNIST_STD)]
        aug = [v2.RandomCrop(28, padding=2)] if self.augment else []
        return v2.Compose([v2.ToImage(), *aug, *norm]), v2.Compose([v2.ToImage(), *norm])

    def build(self):
        train_tf, eval_tf = self._transforms()
        folder = Path(self.data_dir)
        if self.source == "t10k":
            if not folder.is_dir() or not has_t10k(folder):
                raise UserError(
                    f"MNIST data folder {str(folder)!r} not found or incomplete: set data.data_dir to a folder "
                    f"holding t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] (or torchvision's "
                    f"MNIST/raw layout), or data.download=true"
                )
            full = self.prepare_images(*load_t10k(str(folder.resolve())))
            train_idx, val_idx, test_idx = split_indices(len(full), T10K_SPLIT, seed=0)
            return full.subset(train_idx, train_tf), full.subset(val_idx, eval_tf), full.subset(test_idx, eval_tf)
        try:
            train_aug = datasets.MNIST(self.data_dir, train=True, download=self.download, transform=train_tf)
            train_plain = datasets.MNIST(self.data_dir, train=True, transform=eval_tf)
            test = datasets.MNIST(self.data_dir, train=False, transform=eval_tf)
        except RuntimeError as e:
            raise UserError(f"MNIST not found under {self.data_dir!r} ({e}); set data.data_dir or data.download=true")
        val_idx, train_idx = split_indices(len(train_aug), [self.val_size, len(train_aug) - self.val_size], self.seed)
        from torch.utils.data import Subset

        return Subset(train_aug, train_idx.tolist()), Subset(train_plain, val_idx.tolist()), test
