"""CIFAR-10/100, SVHN and ImageNet through torchvision's own data set classes.

Each holds out ``val_size`` training images (deterministic) as the calibration split; the official
test split is the test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from experiments.data.base import ClassificationDataModule, resolve_size, split_indices
from gating.errors import UserError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _compose(steps: list, mean, std) -> v2.Compose:
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _open(name: str, factory: Callable[[], Dataset], data_dir: str) -> Dataset:
    try:
        return factory()
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise UserError(
            f"{name} not found or corrupt under {data_dir!r} ({e}): set data.data_dir to the folder that holds "
            f"it, or data.download=true to fetch it there"
        ) from None


class _HeldOutVal(ClassificationDataModule):
    """Shared split logic: train = train set less ``val_size`` held out; test = official test set."""

    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __init__(self, data_dir: str, download: bool = False, val_size: int | float = 5000, augment: bool = True,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_dir, self.download, self.val_size, self.augment = str(data_dir), download, val_size, augment

    def train_augment(self) -> list:
        return []

    def datasets(self, train_tf, eval_tf) -> tuple[Dataset, Dataset, Dataset]:
        """(train set with augmentation, the same train set without, test set)."""
        raise NotImplementedError

    def build(self):
        aug = self.train_augment() if self.augment else []
        train_aug, train_plain, test = self.datasets(_compose(aug, self.mean, self.std),
                                                     _compose([], self.mean, self.std))
        n = len(train_aug)
        n_val = resolve_size(self.val_size, n)
        val_idx, train_idx = split_indices(n, [n_val, n - n_val], self.seed)
        self._check_classes(train_aug)
        return Subset(train_aug, train_idx.tolist()), Subset(train_plain, val_idx.tolist()), test

    def _check_classes(self, ds: Dataset) -> None:
        classes = getattr(ds, "classes", None)
        if classes is not None and len(classes) != self.num_classes:
            raise UserError(f"the data under {self.data_dir!r} has {len(classes)} classes but data.num_classes="
                            f"{self.num_classes}: set data.num_classes={len(classes)}")


class CIFAR10DataModule(_HeldOutVal):
    """CIFAR-10 (``cifar-10-batches-py`` under ``data_dir``); crop with 4-pixel padding and flips."""

    mean, std = CIFAR10_MEAN, CIFAR10_STD
    dataset_cls = datasets.CIFAR10

    def __init__(self, data_dir: str, **kwargs) -> None:
        kwargs.setdefault("num_classes", 10 if self.dataset_cls is datasets.CIFAR10 else 100)
        kwargs.setdefault("in_chans", 3)
        kwargs.setdefault("image_size", 32)
        super().__init__(data_dir, **kwargs)

    def train_augment(self) -> list:
        return [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]

    def datasets(self, train_tf, eval_tf):
        name, cls, d = self.dataset_cls.__name__, self.dataset_cls, self.data_dir
        return (
            _open(name, lambda: cls(d, train=True, download=self.download, transform=train_tf), d),
            _open(name, lambda: cls(d, train=True, transform=eval_tf), d),
            _open(name, lambda: cls(d, train=False, download=self.download, transform=eval_tf), d),
        )


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (``cifar-100-python`` under ``data_dir``)."""

    mean, std = CIFAR100_MEAN, CIFAR100_STD
    dataset_cls = datasets.CIFAR100


class SVHNDataModule(_HeldOutVal):
    """SVHN (``train_32x32.mat``, ``test_32x32.mat``, optionally ``extra_32x32.mat``); no flips (digits).

    Args:
        use_extra: add the 531k ``extra`` images to training, as SkipNet's SVHN recipe does.
    """

    mean, std = SVHN_MEAN, SVHN_STD

    def __init__(self, data_dir: str, use_extra: bool = False, **kwargs) -> None:
        kwargs.setdefault("num_classes", 10)
        kwargs.setdefault("in_chans", 3)
        kwargs.setdefault("image_size", 32)
        super().__init__(data_dir, **kwargs)
        self.use_extra = use_extra

    def train_augment(self) -> list:
        return [v2.RandomCrop(32, padding=2)]

    def datasets(self, train_tf, eval_tf):
        d = self.data_dir

        def svhn(split, tf):
            return _open("SVHN", lambda: datasets.SVHN(d, split=split, download=self.download, transform=tf), d)

        train_aug, train_plain = svhn("train", train_tf), svhn("train", eval_tf)
        if self.use_extra:
            from torch.utils.data import ConcatDataset

            train_aug = ConcatDataset([train_aug, svhn("extra", train_tf)])
            train_plain = ConcatDataset([train_plain, svhn("extra", eval_tf)])
        return train_aug, train_plain, svhn("test", eval_tf)


class ImageNetDataModule(_HeldOutVal):
    """ImageNet (or any data set) in ImageFolder layout: ``data_dir/train/<class>/*.JPEG`` and
    ``data_dir/val/<class>/*.JPEG``. The official ``val`` folder is the test set; calibration images are
    held out of ``train``. Standard ResNet augmentation: random-resized crop and flip; eval resizes to
    ``image_size / 0.875`` and center-crops.
    """

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, data_dir: str, val_size: int | float = 10000, **kwargs) -> None:
        kwargs.setdefault("num_classes", 1000)
        kwargs.setdefault("in_chans", 3)
        kwargs.setdefault("image_size", 224)
        kwargs.setdefault("num_workers", 8)
        super().__init__(data_dir, download=False, val_size=val_size, **kwargs)

    def train_augment(self) -> list:
        return [v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip()]

    def datasets(self, train_tf, eval_tf):
        root = Path(self.data_dir)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise UserError(f"ImageNet folder {str(root / split)!r} not found: set data.data_dir to a folder "
                                f"with train/ and val/ in ImageFolder layout (val/ sorted into class folders)")
        resize = int(round(self.image_size / 0.875))
        eval_steps = [v2.Resize(resize, antialias=True), v2.CenterCrop(self.image_size)]
        # The held-out calibration split must see eval transforms, so it reads train/ with them.
        eval_tf = _compose(eval_steps, self.mean, self.std)
        if not self.augment:
            train_tf = eval_tf
        return (datasets.ImageFolder(str(root / "train"), transform=train_tf),
                datasets.ImageFolder(str(root / "train"), transform=eval_tf),
                datasets.ImageFolder(str(root / "val"), transform=eval_tf))
