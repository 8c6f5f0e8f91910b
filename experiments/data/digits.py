"""scikit-learn's bundled 8x8 digits (1,797 images): the embedded default data set, no download."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from experiments.data.base import ClassificationDataModule, split_indices

# Pixel statistics of the whole set after scaling 0..16 to 0..1.
DIGITS_MEAN, DIGITS_STD = (0.3054,), (0.3781,)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as uint8 images ``[N, 1, 8, 8]`` (0..16 scaled to 0..255) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().clip(0, 255)).to(torch.uint8).unsqueeze(1)
    return images, torch.from_numpy(d.target).long()


class DigitsDataModule(ClassificationDataModule):
    """Digits split deterministically into train/val/test.

    Args:
        val_size: held-out calibration samples.
        test_size: test samples.
        augment: random 1-pixel shifts on training images.
        **kwargs: see :class:`ClassificationDataModule`.
    """

    def __init__(self, val_size: int = 180, test_size: int = 360, augment: bool = True, **kwargs) -> None:
        kwargs.setdefault("num_classes", 10)
        kwargs.setdefault("in_chans", 1)
        kwargs.setdefault("image_size", 8)
        super().__init__(**kwargs)
        self.val_size, self.test_size, self.augment = val_size, test_size, augment

    def build(self):
        images, targets = load_digits_tensors()
        full = self.prepare_images(images, targets)
        n = len(full)
        test_idx, val_idx, train_idx = split_indices(n, [self.test_size, self.val_size, n - self.test_size -
                                                          self.val_size], self.seed)
        norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(DIGITS_MEAN, DIGITS_STD)]
        aug = [v2.RandomCrop(8, padding=1)] if self.augment else []
        return (
            full.subset(train_idx, v2.Compose([*aug, *norm])),
            full.subset(val_idx, v2.Compose(norm)),
            full.subset(test_idx, v2.Compose(norm)),
        )
