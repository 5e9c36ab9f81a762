"""``BinaryPairDataModule``: one MNIST or CIFAR-10 class against another, as in Long's after-kernel paper."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_afterkernel.data.augmentation import AugmentedDataset, random_affine
from lightning_afterkernel.data.sources import (
    IMAGE_SHAPES,
    check_dataset,
    load_bundled_mnist,
    load_split,
    locate_split,
)
from lightning_afterkernel.errors import ConfigurationError, DataError

SPLITS = ("train", "val", "test")


class BinaryPairDataModule(pl.LightningDataModule):
    """Binary task "plus class vs minus class": plus -> label 1, minus -> label 0.

    Images are float32 N x C x H x W with pixels ``uint8 / 255`` in [0, 1] and no other normalisation;
    labels are int64. The defaults (MNIST 8 vs 3) give the paper's 11,982 train / 1,984 test examples;
    CIFAR-10 ship (8) vs cat (3) gives 10,000 / 2,000.

    Args:
        dataset: ``"mnist"`` or ``"cifar10"``.
        root: folder holding the data (layouts in :mod:`lightning_afterkernel.data.sources`; for both
            datasets ``../shared/data`` works). ``None`` uses the small real MNIST 3-vs-8 subset bundled
            with the package (2,000 train / 500 test, see ``bundled/PROVENANCE.md``).
        download: download the files through torchvision when they are missing (in ``prepare_data``).
        cache_dir: where downloads go when ``root`` is not writable, also searched after ``root``;
            default ``$XDG_CACHE_HOME/lightning_afterkernel`` or ``~/.cache/lightning_afterkernel``.
        plus_class, minus_class: official class ids 0..9, different.
        batch_size, num_workers: for every dataloader.
        train_subset, test_subset: use a random subset of this many examples (``None``: all). Drawn
            without replacement with ``torch.Generator().manual_seed(subset_seed)``, kept in original order.
        subset_seed: seed of the subset and validation draws.
        val_size: hold out this many random training examples (drawn before ``train_subset``, disjoint
            from it) as the validation set. With 0 (the default) the validation set *is* the test set:
            the paper has no validation split, and this lets Lightning report test accuracy every epoch.
        shuffle: shuffle the training loader (seeded by ``pytorch_lightning.seed_everything``).
        rotation_degrees, shift_pixels, zoom: augmentation of the *training loader* only, drawn afresh per image
            and epoch (see :func:`~lightning_afterkernel.data.augmentation.random_affine`): a rotation by an angle
            uniform in +-``rotation_degrees``, a shift by round(U(-s, s)) whole pixels per axis with
            s = ``shift_pixels``, a zoom by a scale uniform in 1 +- ``zoom``; one bilinear resampling, zero fill.
            All 0 (the default): no augmentation. ``tensors(split)``, the validation and test loaders, and so
            every kernel, always see the original images. The transform is the attribute ``augmentation``
            (a ``v2.RandomAffine``, or None).

    The paper's augmentation (``--use_augmentation``) is ``rotation_degrees=15``: its Keras
    ``ImageDataGenerator(rotation_range=15, width_shift_range=1, height_shift_range=1)`` meant a +-1 px shift
    too, but Keras reads an *int* shift range s as "choose from range(s)", so the shift was always 0; for the
    intended shift add ``shift_pixels=1`` (-1, 0, +1 px with probabilities 1/4, 1/2, 1/4, which is what Keras
    draws for ``width_shift_range=2``). Other differences from Keras: it fills the uncovered border with the
    nearest edge pixel (the same on MNIST, whose borders are black; not on CIFAR-10), and its zoom draws the
    horizontal and vertical scales independently (here one isotropic scale; the paper did not zoom in training).
    """

    def __init__(
        self,
        dataset: str = "mnist",
        root: str | None = None,
        download: bool = False,
        cache_dir: str | None = None,
        plus_class: int = 8,
        minus_class: int = 3,
        batch_size: int = 32,
        num_workers: int = 0,
        train_subset: int | None = None,
        test_subset: int | None = None,
        subset_seed: int = 0,
        val_size: int = 0,
        shuffle: bool = True,
        rotation_degrees: float = 0.0,
        shift_pixels: int = 0,
        zoom: float = 0.0,
    ) -> None:
        super().__init__()
        check_dataset(dataset)
        for name, value in (("plus_class", plus_class), ("minus_class", minus_class)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
                raise DataError(
                    f"{name}={value!r} is not a {dataset} class id; use an integer 0..9 "
                    "(e.g. MNIST digits, or CIFAR-10 3 = cat, 8 = ship)"
                )
        if plus_class == minus_class:
            raise ConfigurationError(
                f"plus_class == minus_class == {plus_class}; the two classes of the task must differ"
            )
        if root is None and (dataset != "mnist" or {plus_class, minus_class} != {3, 8}):
            raise DataError(
                f"root=None selects the bundled MNIST 3-vs-8 subset, which cannot serve dataset={dataset!r} "
                f"with plus_class={plus_class}, minus_class={minus_class}; pass root (a folder holding the "
                f"data, with download=True to fetch it)"
            )
        if batch_size < 1:
            raise ConfigurationError(f"batch_size={batch_size}; it must be positive")
        if num_workers < 0:
            raise ConfigurationError(f"num_workers={num_workers}; it must be >= 0")
        for name, value in (("train_subset", train_subset), ("test_subset", test_subset)):
            if value is not None and value < 1:
                raise ConfigurationError(f"{name}={value}; use a positive size, or None for the whole split")
        if val_size < 0:
            raise ConfigurationError(f"val_size={val_size}; it must be >= 0")
        h, w, _ = IMAGE_SHAPES[dataset]
        self.augmentation = random_affine(rotation_degrees, shift_pixels, zoom, (h, w))
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = root
        self.download = download
        self.cache_dir = cache_dir
        self.plus_class = plus_class
        self.minus_class = minus_class
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.subset_seed = subset_seed
        self.val_size = val_size
        self.shuffle = shuffle
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """C x H x W of one image: (1, 28, 28) for MNIST, (3, 32, 32) for CIFAR-10."""
        h, w, c = IMAGE_SHAPES[self.dataset]
        return c, h, w

    @property
    def num_classes(self) -> int:
        """Always 2 (the model outputs one logit)."""
        return 2

    def prepare_data(self) -> None:
        """Download both splits if ``download=True`` and they are missing (Lightning runs this on rank 0)."""
        if self.download and self.root is not None:
            for train in (True, False):
                locate_split(self.dataset, self.root, train, download=True, cache_dir=self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load and split the data once; later calls, for any stage, return at once."""
        if self.train_dataset is not None:
            return
        x_train, y_train = self._load(train=True)
        x_test, y_test = self._load(train=False)

        n_pool = len(y_train)
        n_train = n_pool - self.val_size if self.train_subset is None else self.train_subset
        if n_train < 1 or self.val_size + n_train > n_pool:
            raise DataError(
                f"train_subset={self.train_subset} plus val_size={self.val_size} need more training examples "
                f"than the {n_pool} available in the {self._task} training split (train_subset=None keeps "
                f"all but the validation examples)"
            )
        order = torch.randperm(n_pool, generator=torch.Generator().manual_seed(self.subset_seed)).numpy()
        train_idx = np.sort(order[self.val_size : self.val_size + n_train])
        val_idx = np.sort(order[: self.val_size])

        n_test = len(y_test) if self.test_subset is None else self.test_subset
        if n_test > len(y_test):
            raise DataError(
                f"test_subset={self.test_subset}, but the {self._task} test split has {len(y_test)} examples"
            )
        test_order = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(self.subset_seed))
        test_idx = np.sort(test_order.numpy()[:n_test])

        self.train_dataset = self._tensor_dataset("train", x_train[train_idx], y_train[train_idx])
        self.test_dataset = self._tensor_dataset("test", x_test[test_idx], y_test[test_idx])
        if self.val_size:
            self.val_dataset = self._tensor_dataset("val", x_train[val_idx], y_train[val_idx])
        else:
            self.val_dataset = self.test_dataset

    def tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"`` (runs ``setup`` first if needed)."""
        x, y = self._split(split).tensors
        return x, y

    def train_dataloader(self) -> DataLoader:
        """Training batches, augmented per image when an augmentation is set."""
        return self._loader("train", shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    @property
    def _task(self) -> str:
        return f"{self.dataset} {self.plus_class}-vs-{self.minus_class}"

    def _load(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """The two classes of one official split: images uint8 N x H x W x C, labels 1 (plus) / 0 (minus)."""
        if self.root is None:
            images, labels = load_bundled_mnist(train)
        else:
            images, labels = load_split(self.dataset, self.root, train, cache_dir=self.cache_dir)
        present = np.unique(labels)
        for cls in (self.plus_class, self.minus_class):
            if cls not in present:
                where = "the bundled subset" if self.root is None else f"root={self.root!r}"
                raise DataError(
                    f"no {self.dataset} {'train' if train else 'test'} images of class {cls} in {where}, "
                    f"which holds classes {present.tolist()}"
                )
        keep = np.isin(labels, (self.plus_class, self.minus_class))
        return images[keep], (labels[keep] == self.plus_class).astype(np.int64)

    def _tensor_dataset(self, split: str, images: np.ndarray, labels: np.ndarray) -> TensorDataset:
        if len(np.unique(labels)) < 2:
            raise DataError(
                f"the {split} split of {self._task} ({len(labels)} examples, subset_seed={self.subset_seed}) "
                f"holds only one class; draw a larger subset or change subset_seed"
            )
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(torch.float32) / 255
        return TensorDataset(x, torch.from_numpy(labels))

    def _split(self, split: str) -> TensorDataset:
        if split not in SPLITS:
            raise ConfigurationError(f"split={split!r}; use one of {', '.join(map(repr, SPLITS))}")
        self.setup()
        return {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}[split]

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        dataset = self._split(split)
        if split == "train" and self.augmentation is not None:
            dataset = AugmentedDataset(dataset, self.augmentation)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
