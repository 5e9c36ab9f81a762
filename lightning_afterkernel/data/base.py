"""The machinery the image data modules share: sources, class selection and labels, subsets, loaders."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_afterkernel.data.augmentation import AugmentedDataset, random_affine
from lightning_afterkernel.data.sources import (
    CLASS_NAMES,
    IMAGE_SHAPES,
    default_cache_dir,
    load_bundled_mnist,
    load_split,
    locate_split,
)
from lightning_afterkernel.errors import ConfigurationError, DataError

SPLITS = ("train", "val", "test")
BUNDLED_CLASSES = (3, 8)
"""The MNIST digits of the subset bundled with the package (``root=None``)."""


class ImageDataModuleBase(pl.LightningDataModule):
    """Images of some classes of MNIST or CIFAR-10, labelled 0..k-1 in the order of ``classes``.

    Images are float32 N x C x H x W with pixels ``uint8 / 255`` in [0, 1] and no other normalisation; labels
    are int64. Subclasses check their own class arguments, call ``__init__`` with the official class ids in
    label order, then ``save_hyperparameters()`` (so the hyperparameters are the subclass's arguments).

    Args:
        dataset: ``"mnist"`` or ``"cifar10"`` (checked by the subclass).
        root: folder holding the data (layouts in :mod:`lightning_afterkernel.data.sources`; for both
            datasets ``../shared/data`` works, though its CIFAR-10 holds only cats and ships). ``None`` uses the
            small real MNIST 3-vs-8 subset bundled with the package (2,000 train / 500 test, see
            ``bundled/PROVENANCE.md``).
        download: download the files through torchvision when they are missing (in ``prepare_data``).
        cache_dir: where downloads go when ``root`` is not writable, also searched after ``root``;
            default ``$XDG_CACHE_HOME/lightning_afterkernel`` or ``~/.cache/lightning_afterkernel``.
        classes: official class ids 0..9 in label order (class ``classes[i]`` gets label i).
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

    Every split must hold every class (a subset that misses one raises :class:`DataError`).
    """

    def __init__(
        self,
        dataset: str,
        root: str | None,
        download: bool,
        cache_dir: str | None,
        classes: Sequence[int],
        batch_size: int,
        num_workers: int,
        train_subset: int | None,
        test_subset: int | None,
        subset_seed: int,
        val_size: int,
        shuffle: bool,
        rotation_degrees: float,
        shift_pixels: int,
        zoom: float,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.classes = [int(c) for c in classes]
        if root is None and (dataset != "mnist" or sorted(self.classes) != list(BUNDLED_CLASSES)):
            raise DataError(
                f"root=None selects the bundled MNIST 3-vs-8 subset, which cannot serve {self._task}; pass root "
                f"(a folder holding the data, with download=True to fetch it)"
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
        self.root = root
        self.download = download
        self.cache_dir = cache_dir
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
        """k, the number of classes (labels 0..k-1)."""
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """The official name of each class, in label order (MNIST: the digit; CIFAR-10: e.g. ``"cat"``)."""
        return [CLASS_NAMES[self.dataset][c] for c in self.classes]

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
        """The task in words, for messages."""
        return f"{self.dataset} classes {self.classes}"

    def _describe(self, classes: Sequence[int]) -> str:
        names = [str(c) if self.dataset == "mnist" else f"{c} ({CLASS_NAMES[self.dataset][c]})" for c in classes]
        return f"class {names[0]}" if len(names) == 1 else f"classes {', '.join(names)}"

    def _load(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """The task's classes of one official split: images uint8 N x H x W x C, labels 0..k-1."""
        if self.root is None:
            images, labels = load_bundled_mnist(train)
        else:
            images, labels = load_split(self.dataset, self.root, train, cache_dir=self.cache_dir)
        present = np.unique(labels)
        missing = [c for c in self.classes if c not in present]
        if missing:
            where = "the bundled subset" if self.root is None else f"root={self.root!r}"
            raise DataError(
                f"no {self.dataset} {'train' if train else 'test'} images of {self._describe(missing)} in {where}, "
                f"which holds classes {present.tolist()}{self._partial_source_hint(train)}"
            )
        label_of = np.full(10, -1, dtype=np.int64)
        label_of[self.classes] = np.arange(len(self.classes))
        keep = np.isin(labels, self.classes)
        return images[keep], label_of[labels[keep]]

    def _partial_source_hint(self, train: bool) -> str:
        """How to get every class when the files found are an npz holding only some CIFAR-10 classes."""
        if self.root is None:
            return ""
        files = locate_split(self.dataset, self.root, train, cache_dir=self.cache_dir)
        if files[0].suffix != ".npz":
            return ""
        return (
            f". {files[0]} holds only these classes (the repository's offline copy keeps cats and ships); for the "
            f"others pass download=True and a root without train.npz/test.npz, e.g. root='{default_cache_dir()}', "
            f"where torchvision downloads the whole CIFAR-10 (about 170 MB)"
        )

    def _tensor_dataset(self, split: str, images: np.ndarray, labels: np.ndarray) -> TensorDataset:
        present = np.unique(labels)
        if len(present) < self.num_classes:
            held = "only one class" if len(present) == 1 else f"only {len(present)} of its {self.num_classes} classes"
            absent = [c for i, c in enumerate(self.classes) if i not in present]
            raise DataError(
                f"the {split} split of {self._task} ({len(labels)} examples, subset_seed={self.subset_seed}) "
                f"holds {held} (none of {self._describe(absent)}); draw a larger subset or change subset_seed"
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
