"""Data modules: splits, formats, determinism, and clear errors for missing data."""

from __future__ import annotations

import shutil

import pytest
import torch

from experiments.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageNetDataModule,
    MNISTDataModule,
    SVHNDataModule,
    SyntheticDataModule,
)
from gating import UserError
from tests.conftest import MNIST_T10K, needs_mnist
from tests.helpers.fake_data import write_cifar, write_image_folder, write_mnist_full, write_svhn


def _indices_of(ds):
    """Recover the rows a split holds, as a set of image hashes (split storage differs per module)."""
    return {hash(ds.images[i].numpy().tobytes()) for i in range(len(ds))}


def test_digits_splits():
    dm = DigitsDataModule()
    assert dm.split_sizes() == {"train": 1257, "val": 180, "test": 360}
    tr, va, te = (_indices_of(d) for d in (dm.data_train, dm.data_val, dm.data_test))
    assert not (va & te) and len(te - tr) > 300  # the few shared hashes are duplicate images in the data set
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (dm.batch_size, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, _ = next(iter(dm.test_dataloader()))
    assert abs(x.mean().item()) < 0.1 and 0.9 < x.std().item() < 1.1  # normalised
    again = DigitsDataModule()
    again.setup()
    assert torch.equal(again.data_test.targets, dm.data_test.targets)  # deterministic


@needs_mnist
def test_mnist_t10k_split_is_7000_1000_2000_and_fixed():
    dm = MNISTDataModule(str(MNIST_T10K))
    assert dm.source == "t10k"
    assert dm.split_sizes() == {"train": 7000, "val": 1000, "test": 2000}
    tr, va, te = (_indices_of(d) for d in (dm.data_train, dm.data_val, dm.data_test))
    assert len(tr) > 6900 and not (tr & te) and not (va & te) and not (tr & va)
    assert torch.bincount(dm.data_test.targets, minlength=10).min() > 150  # every class present
    # The split does not depend on the data module's seed: the whole project shares it.
    other = MNISTDataModule(str(MNIST_T10K), seed=99)
    other.setup()
    assert torch.equal(other.data_test.targets, dm.data_test.targets)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (128, 1, 28, 28)


@needs_mnist
def test_mnist_md5_mismatch_is_reported(tmp_path):
    for f in MNIST_T10K.iterdir():
        shutil.copy(f, tmp_path / f.name)
    sums = (tmp_path / "MD5SUMS").read_text().splitlines()
    (tmp_path / "MD5SUMS").write_text("\n".join("0" * 32 + line[32:] for line in sums))
    from experiments.data.mnist import load_t10k

    with pytest.raises(UserError, match="md5"):
        load_t10k(str(tmp_path))


def test_mnist_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="data.data_dir"):
        MNISTDataModule(str(tmp_path / "nowhere")).setup()


def test_mnist_full_torchvision_layout(tmp_path):
    write_mnist_full(tmp_path, n_train=60, n_test=20)
    dm = MNISTDataModule(str(tmp_path), val_size=12, batch_size=8)
    assert dm.source == "full"
    assert dm.split_sizes() == {"train": 48, "val": 12, "test": 20}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28)


def test_t10k_gzip_and_plain_files_read_the_same(tmp_path):
    import gzip

    import numpy as np

    from experiments.data.mnist import load_t10k
    from tests.helpers.fake_data import write_idx

    imgs, labels = np.random.default_rng(0).integers(0, 256, (30, 28, 28)), np.arange(30) % 10
    plain, gz = tmp_path / "plain", tmp_path / "gz"
    plain.mkdir(), gz.mkdir()
    write_idx(plain / "t10k-images-idx3-ubyte", imgs)
    write_idx(plain / "t10k-labels-idx1-ubyte", labels)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (gz / f"{name}.gz").write_bytes(gzip.compress((plain / name).read_bytes()))
    a, b = load_t10k(str(plain)), load_t10k(str(gz))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (30, 1, 28, 28) and torch.equal(a[0][:, 0], torch.from_numpy(imgs).to(torch.uint8))


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_from_real_format(tmp_path, skip_integrity_checks, hundred):
    write_cifar(tmp_path, hundred=hundred, n_per_batch=20, n_test=16)
    cls = CIFAR100DataModule if hundred else CIFAR10DataModule
    dm = cls(str(tmp_path), download=False, val_size=10, batch_size=8)
    assert dm.num_classes == (100 if hundred else 10)
    assert dm.split_sizes() == {"train": 90, "val": 10, "test": 16}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32


def test_cifar_missing_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="data.download=true"):
        CIFAR10DataModule(str(tmp_path), download=False).setup()


def test_svhn_from_real_format(tmp_path, skip_integrity_checks):
    write_svhn(tmp_path, n=30)
    dm = SVHNDataModule(str(tmp_path), download=False, val_size=6, batch_size=4)
    assert dm.split_sizes() == {"train": 24, "val": 6, "test": 30}
    _, y = next(iter(dm.test_dataloader()))
    assert y.min() >= 0 and y.max() <= 9  # SVHN's label 10 means digit 0
    with_extra = SVHNDataModule(str(tmp_path), download=False, val_size=6, use_extra=True)
    assert with_extra.split_sizes()["train"] == 54


def test_imagenet_folder_layout(tmp_path):
    write_image_folder(tmp_path, classes=3, per_class=6)
    dm = ImageNetDataModule(str(tmp_path), num_classes=3, image_size=32, val_size=3, batch_size=4, num_workers=0)
    assert dm.split_sizes() == {"train": 15, "val": 3, "test": 18}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (3, 32, 32)
    with pytest.raises(UserError, match="data.num_classes=3"):
        ImageNetDataModule(str(tmp_path), image_size=32, num_workers=0).setup()
    with pytest.raises(UserError, match="ImageFolder"):
        ImageNetDataModule(str(tmp_path / "none"), num_workers=0).setup()


def test_synthetic_difficulty_knob():
    dm = SyntheticDataModule(num_train=600, num_val=100, num_test=100, image_size=12, noise=0.3)
    dm.setup()
    train = dm.data_train
    assert train.difficulty is not None and len(train.difficulty) == 600
    # Nearest-class-mean accuracy falls as difficulty rises: the knob makes inputs harder.
    x = train.images.float().flatten(1)
    means = torch.stack([x[train.targets == c].mean(0) for c in range(10)])
    pred = torch.cdist(x, means).argmin(1)
    correct = (pred == train.targets).float()
    easy, hard = train.difficulty < 0.15, train.difficulty > 0.35
    assert correct[easy].mean() > correct[hard].mean() + 0.1
    again = SyntheticDataModule(num_train=600, num_val=100, num_test=100, image_size=12, noise=0.3)
    again.setup()
    assert torch.equal(again.data_train.images, train.images)


def test_splits_by_name():
    dm = DigitsDataModule(augment=False)
    assert dm.split("test") is dm.data_test and len(dm.split("val")) == 180
    assert sum(len(x) for x, _ in dm.eval_dataloader("val")) == 180
    with pytest.raises(UserError, match="split must be"):
        dm.split("dev")
