"""Lightning DataModules, one per data set, chosen by the ``data=`` config group."""

from experiments.data.base import ClassificationDataModule, TensorImageDataset, batches_to_tensor, split_indices
from experiments.data.digits import DigitsDataModule
from experiments.data.graded import GradedDigitsDataModule, GradedMNISTDataModule
from experiments.data.mnist import MNISTDataModule
from experiments.data.synthetic import SyntheticDataModule
from experiments.data.vision import CIFAR10DataModule, CIFAR100DataModule, ImageNetDataModule, SVHNDataModule

__all__ = [
    "CIFAR10DataModule", "CIFAR100DataModule", "ClassificationDataModule", "DigitsDataModule",
    "GradedDigitsDataModule", "GradedMNISTDataModule", "ImageNetDataModule", "MNISTDataModule", "SVHNDataModule",
    "SyntheticDataModule", "TensorImageDataset", "batches_to_tensor", "split_indices",
]
