"""Data: the binary "plus class vs minus class" datamodule and the raw MNIST / CIFAR-10 loaders."""

from lightning_afterkernel.data.datamodule import BinaryPairDataModule
from lightning_afterkernel.data.sources import load_bundled_mnist, load_split

__all__ = ["BinaryPairDataModule", "load_bundled_mnist", "load_split"]
