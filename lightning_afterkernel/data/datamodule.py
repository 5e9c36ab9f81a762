"""The image data modules: ``ImageClassDataModule`` (any classes of MNIST or CIFAR-10) and
``BinaryPairDataModule`` (one class against another, as in Long's after-kernel paper)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_afterkernel.data.base import ImageDataModuleBase
from lightning_afterkernel.data.sources import check_dataset
from lightning_afterkernel.errors import ConfigurationError, DataError


def check_classes(dataset: str, classes: Sequence[int] | None) -> list[int]:
    """``classes`` as a list of distinct official class ids, at least two (``None``: all ten), or raise."""
    if classes is None:
        return list(range(10))
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise DataError(f"classes={classes!r}; give a list of {dataset} class ids 0..9, or None for all ten")
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 9:
            raise DataError(
                f"classes={list(classes)!r}: {c!r} is not a {dataset} class id; use integers 0..9 "
                "(e.g. MNIST digits, or CIFAR-10 3 = cat, 8 = ship)"
            )
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise ConfigurationError(f"classes={list(classes)} repeats {repeated}; list each class once")
    if len(classes) < 2:
        raise ConfigurationError(f"classes={list(classes)}; a classification task needs at least two classes")
    return list(classes)


class ImageClassDataModule(ImageDataModuleBase):
    """The images of ``classes`` of MNIST or CIFAR-10, labelled 0..k-1 in the order of ``classes``.

    ``classes=None`` (the default) takes all ten classes, labelled by their official ids; the whole splits then
    hold 60,000 / 10,000 (MNIST) and 50,000 / 10,000 (CIFAR-10) images. Properties: ``num_classes`` (k),
    ``classes`` (the official ids in label order), ``class_names`` (their names, for figures), ``input_shape``.

    Args:
        classes: official class ids 0..9, distinct, at least two; ``None``: all ten.
        dataset, root, download, cache_dir, batch_size, num_workers, train_subset, test_subset, subset_seed,
            val_size, shuffle, rotation_degrees, shift_pixels, zoom: as in
            :class:`~lightning_afterkernel.data.base.ImageDataModuleBase` (the same as ``BinaryPairDataModule``).

    The CIFAR-10 npz files of ``../shared/data`` hold only cats and ships: the other classes need torchvision's
    CIFAR-10 (``download=True`` and a root without ``train.npz``/``test.npz``); asking an npz for a class it
    lacks raises :class:`~lightning_afterkernel.errors.DataError` saying so. ``root=None`` (the bundled MNIST
    subset) serves only ``classes=[3, 8]`` or ``[8, 3]``.
    """

    def __init__(
        self,
        dataset: str = "mnist",
        root: str | None = None,
        download: bool = False,
        cache_dir: str | None = None,
        classes: list[int] | None = None,
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
        check_dataset(dataset)
        super().__init__(
            dataset,
            root,
            download,
            cache_dir,
            check_classes(dataset, classes),
            batch_size,
            num_workers,
            train_subset,
            test_subset,
            subset_seed,
            val_size,
            shuffle,
            rotation_degrees,
            shift_pixels,
            zoom,
        )
        self.save_hyperparameters()

    @property
    def _task(self) -> str:
        return f"{self.dataset} (all ten classes)" if self.classes == list(range(10)) else super()._task


class BinaryPairDataModule(ImageDataModuleBase):
    """Binary task "plus class vs minus class": plus -> label 1, minus -> label 0.

    Images are float32 N x C x H x W with pixels ``uint8 / 255`` in [0, 1] and no other normalisation;
    labels are int64. The defaults (MNIST 8 vs 3) give the paper's 11,982 train / 1,984 test examples;
    CIFAR-10 ship (8) vs cat (3) gives 10,000 / 2,000. ``num_classes`` is 2 (the model outputs one logit),
    ``classes`` is ``[minus_class, plus_class]`` (label order) and ``class_names`` their names.

    Args:
        plus_class, minus_class: official class ids 0..9, different.
        dataset, root, download, cache_dir, batch_size, num_workers, train_subset, test_subset, subset_seed,
            val_size, shuffle, rotation_degrees, shift_pixels, zoom: as in
            :class:`~lightning_afterkernel.data.base.ImageDataModuleBase`.

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
        super().__init__(
            dataset,
            root,
            download,
            cache_dir,
            [minus_class, plus_class],
            batch_size,
            num_workers,
            train_subset,
            test_subset,
            subset_seed,
            val_size,
            shuffle,
            rotation_degrees,
            shift_pixels,
            zoom,
        )
        self.save_hyperparameters()
        self.plus_class = plus_class
        self.minus_class = minus_class

    @property
    def _task(self) -> str:
        minus, plus = self.classes
        return f"{self.dataset} {plus}-vs-{minus}"
