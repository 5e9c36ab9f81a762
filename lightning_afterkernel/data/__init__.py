"""Data: the image data modules (``ImageClassDataModule``, ``BinaryPairDataModule``) and the raw MNIST / CIFAR-10
loaders."""

from lightning_afterkernel.data.datamodule import BinaryPairDataModule, ImageClassDataModule
from lightning_afterkernel.data.sources import CLASS_NAMES, load_bundled_mnist, load_split

__all__ = ["CLASS_NAMES", "BinaryPairDataModule", "ImageClassDataModule", "load_bundled_mnist", "load_split"]
