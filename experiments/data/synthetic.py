"""Fast fake images with a per-sample difficulty knob, for tests and quick checks.

Each class has a fixed smooth random prototype. A sample of class ``y`` with difficulty ``d`` is
``(1 - d) * proto[y] + d * proto[c] + noise * N(0, 1)`` for a random other class ``c``: at ``d = 0`` it is
the prototype, and as ``d`` nears 0.5 it becomes ambiguous. ``dataset.difficulty`` keeps ``d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from experiments.data.base import ClassificationDataModule, TensorImageDataset


def make_synthetic(
    num_samples: int, num_classes: int, in_chans: int, image_size: int,
    difficulty_range: tuple[float, float] = (0.0, 0.45), noise: float = 0.15, seed: int = 0,
) -> TensorImageDataset:
    """Generate the images (uint8), labels and difficulties deterministically from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    low = max(2, image_size // 4)
    protos = F.interpolate(torch.rand(num_classes, in_chans, low, low, generator=g), size=image_size,
                           mode="bilinear", align_corners=False)
    y = torch.randint(0, num_classes, (num_samples,), generator=g)
    other = (y + torch.randint(1, num_classes, (num_samples,), generator=g)) % num_classes
    lo, hi = difficulty_range
    d = lo + (hi - lo) * torch.rand(num_samples, generator=g)
    w = d.view(-1, 1, 1, 1)
    x = (1 - w) * protos[y] + w * protos[other] + noise * torch.randn(num_samples, in_chans, image_size, image_size,
                                                                       generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return TensorImageDataset(images, y, difficulty=d)


class SyntheticDataModule(ClassificationDataModule):
    """Synthetic images; train/val/test drawn from one generator and split by position.

    Args:
        num_train, num_val, num_test: split sizes.
        difficulty_range: per-sample difficulty is uniform in this range (0 easy, 0.5 ambiguous).
        noise: standard deviation of the added pixel noise (pixels in 0..1).
        **kwargs: see :class:`ClassificationDataModule`.
    """

    def __init__(self, num_train: int = 512, num_val: int = 128, num_test: int = 128,
                 difficulty_range: tuple[float, float] = (0.0, 0.45), noise: float = 0.15, **kwargs) -> None:
        kwargs.setdefault("num_classes", 10)
        kwargs.setdefault("in_chans", 1)
        kwargs.setdefault("image_size", 16)
        super().__init__(**kwargs)
        self.sizes = (num_train, num_val, num_test)
        self.difficulty_range, self.noise = tuple(difficulty_range), noise

    def build(self):
        full = make_synthetic(sum(self.sizes), self.num_classes, self.in_chans, self.image_size,
                              self.difficulty_range, self.noise, self.seed)
        tf = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * self.in_chans,
                                                                            [0.25] * self.in_chans)])
        a, b = self.sizes[0], self.sizes[0] + self.sizes[1]
        idx = torch.arange(sum(self.sizes))
        return full.subset(idx[:a], tf), full.subset(idx[a:b], tf), full.subset(idx[b:], tf)
