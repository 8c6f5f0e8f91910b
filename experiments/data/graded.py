"""MNIST and digits with a known, graded difficulty: each image corrupted at a severity 0-5 (``mnist_c``,
``digits_c``). The splits are those of ``mnist`` and ``digits``; what changes is the pixels, and every
split mixes every severity. See :mod:`experiments.data.corrupted` for the families and the draw."""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch
from torch.utils.data import Subset

from experiments.data.base import TensorImageDataset
from experiments.data.corrupted import CORRUPTIONS, corrupt, draw_corruptions
from experiments.data.digits import DigitsDataModule
from experiments.data.mnist import MNISTDataModule


class _Graded:
    """Mixin: corrupt the whole data set once before it is split; each image's severity is its difficulty."""

    def __init__(self, corruption_seed: int = 0, families: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.corruption_seed, self.families = corruption_seed, tuple(families or CORRUPTIONS)

    def prepare_images(self, images: torch.Tensor, targets: torch.Tensor, offset: int = 0) -> TensorImageDataset:
        family, severity = draw_corruptions(len(images), self.corruption_seed + offset, self.families)
        corrupted = corrupt(images, family, severity, self.corruption_seed + offset, self.families)
        return TensorImageDataset(corrupted, targets, difficulty=severity, extras={"family": family})

    def mix(self, split: str) -> dict[str, Any]:
        """How many images of ``split`` have each severity and each family (for the docs and run records)."""
        ds = self.split(split)
        fam = Counter(self.families[int(f)] if int(s) else "clean"
                      for f, s in zip(ds.extras["family"], ds.difficulty))
        return {"n": len(ds), "severity": torch.bincount(ds.difficulty, minlength=6).tolist(),
                "family": dict(sorted(fam.items()))}


class GradedMNISTDataModule(_Graded, MNISTDataModule):
    """``mnist_c``: MNIST with every image corrupted at a severity 0-5 drawn from ``corruption_seed``.

    Args:
        corruption_seed: seed of the families, severities and corruption noise (fixed: every run sees the
            same images).
        families: the corruption families to draw from (default: all of
            :data:`experiments.data.corrupted.CORRUPTIONS`).
        **kwargs: see :class:`experiments.data.MNISTDataModule`.
    """

    def build(self):
        splits = super().build()
        if self.source == "t10k":  # prepare_images graded the 10k set before the split
            return splits
        return tuple(self._grade_torchvision(ds, offset) for ds, offset in zip(splits, (0, 0, 1)))

    def _grade_torchvision(self, ds: Any, offset: int) -> TensorImageDataset:
        """A torchvision MNIST split (a ``Subset`` of the 60k training images, or the test set) graded."""
        base, rows = (ds.dataset, torch.as_tensor(ds.indices)) if isinstance(ds, Subset) else (ds, None)
        graded = self.prepare_images(base.data.unsqueeze(1).to(torch.uint8), torch.as_tensor(base.targets), offset)
        return graded.subset(torch.arange(len(graded)) if rows is None else rows, base.transform)


class GradedDigitsDataModule(_Graded, DigitsDataModule):
    """``digits_c``: the 8x8 digits, every image corrupted at a severity 0-5 (the quick start's graded set).

    Args:
        corruption_seed, families: as :class:`GradedMNISTDataModule`.
        **kwargs: see :class:`experiments.data.DigitsDataModule`.
    """
