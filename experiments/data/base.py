"""The DataModule base every data set shares: train/val/test splits, loaders, and data-set facts.

``val`` is always held out from training data and used for calibration (thresholds, early stopping);
``test`` is only for final figures.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from gating.errors import UserError


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 tensor ``[N, C, H, W]``, with a torchvision transform.

    Attributes:
        difficulty: optional per-sample difficulty score (the synthetic and graded data sets set it).
        extras: optional per-sample tensors carried along by :meth:`subset` (e.g. a corruption family).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        transform: Callable | None = None,
        difficulty: torch.Tensor | None = None,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets = images, targets.long()
        self.transform = transform
        self.difficulty = difficulty
        self.extras = dict(extras or {})

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = v2.functional.to_image(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.targets[i])

    def subset(self, indices: torch.Tensor, transform: Callable | None = None) -> "TensorImageDataset":
        """A new data set of the rows ``indices`` with its own transform (the storage is shared)."""
        diff = self.difficulty[indices] if self.difficulty is not None else None
        return TensorImageDataset(self.images[indices], self.targets[indices], transform, diff,
                                  {k: v[indices] for k, v in self.extras.items()})


def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Deterministic disjoint index sets of the given sizes from a seeded permutation of ``range(n)``."""
    if sum(sizes) > n:
        raise UserError(f"split sizes {list(sizes)} need {sum(sizes)} samples but the data has {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for s in sizes:
        out.append(perm[start : start + s])
        start += s
    return out


def resolve_size(size: int | float, n: int) -> int:
    """An absolute count, or a fraction of ``n`` when ``0 < size < 1``."""
    return int(round(size * n)) if isinstance(size, float) and 0 < size < 1 else int(size)


class ClassificationDataModule(LightningDataModule):
    """Base for image classification data: subclasses build ``(train, val, test)`` in :meth:`build`.

    Args:
        num_classes: classes in the data set (checked against the data where it can be).
        in_chans: image channels the loaders yield.
        image_size: side of the square images the loaders yield.
        batch_size: training batch size.
        eval_batch_size: batch size for val/test (default: ``batch_size``).
        num_workers: loader worker processes (0 loads in the main process; best for small in-memory sets).
        pin_memory: pin host memory for faster copies to a GPU.
        seed: seed of the deterministic splits.
        name: the data set's short name (used in run names and reports).
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: int,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name or type(self).__name__.removesuffix("DataModule").lower()
        self.num_classes, self.in_chans, self.image_size = num_classes, in_chans, image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.data_test: Dataset | None = None

    def build(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def prepare_images(self, images: torch.Tensor, targets: torch.Tensor) -> TensorImageDataset:
        """The whole in-memory data set before it is split (graded data sets corrupt it here)."""
        return TensorImageDataset(images, targets)

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is None:
            self.data_train, self.data_val, self.data_test = self.build()

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train and len(ds) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.data_train, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.data_val, train=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.data_test, train=False)

    def split(self, name: str) -> Dataset:
        """The ``train``, ``val`` or ``test`` data set (built if needed)."""
        self.setup()
        splits = {"train": self.data_train, "val": self.data_val, "test": self.data_test}
        if name not in splits:
            raise UserError(f"split must be train, val or test, got {name!r}")
        return splits[name]

    def eval_dataloader(self, name: str) -> DataLoader:
        """An unshuffled loader of split ``name``, at the evaluation batch size."""
        return self._loader(self.split(name), train=False)

    def difficulty(self, split: str) -> torch.Tensor | None:
        """The per-sample difficulty a data set records for ``split`` (``train``/``val``/``test``), in the
        loaders' order (eval loaders do not shuffle), or None where it records none."""
        return getattr(self.split(split), "difficulty", None)

    def split_sizes(self) -> dict[str, int]:
        """Number of samples per split (builds the splits if needed)."""
        self.setup()
        return {"train": len(self.data_train), "val": len(self.data_val), "test": len(self.data_test)}


def batches_to_tensor(batches: Iterable[Any], limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``(x, y)`` batches into one batch (up to ``limit`` samples)."""
    xs, ys, n = [], [], 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        n += len(x)
        if limit is not None and n >= limit:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)
