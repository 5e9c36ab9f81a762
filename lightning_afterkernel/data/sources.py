"""Raw loaders: MNIST idx files, CIFAR-10 npz or pickle batches, and the bundled MNIST 3-vs-8 subset.

Every loader returns ``(images, labels)``: ``images`` uint8 of shape N x H x W x C (channels last, as
stored on disk), ``labels`` int64 holding the official class ids (MNIST digits, CIFAR-10 classes 0..9).
Files are read in place, so read-only roots work. Only a download writes: into ``root`` when it is
writable, otherwise into the cache directory (``cache_dir``, by default
``$XDG_CACHE_HOME/lightning_afterkernel`` or ``~/.cache/lightning_afterkernel``). Files are looked up
in ``root`` first, then in the cache directory.

Layouts searched under a folder ``base`` (``root`` or the cache directory):

- mnist: torchvision's layout, ``base/MNIST/raw/`` or ``base/mnist/MNIST/raw/`` holding
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped (``.gz``) or not;
- cifar10: ``{base,base/cifar10}/{train,test}.npz`` (arrays ``images`` uint8 N x 32 x 32 x 3 and
  ``labels``), or torchvision's ``{base,base/cifar10}/cifar-10-batches-py/``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np

from lightning_afterkernel.errors import DataError

DATASETS = ("mnist", "cifar10")
IMAGE_SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
"""The official class names, indexed by class id."""
BUNDLED_MNIST = Path(__file__).resolve().parent / "bundled" / "mnist_3v8.npz"

_MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_BATCHES = {True: tuple(f"data_batch_{i}" for i in range(1, 6)), False: ("test_batch",)}


def check_dataset(dataset: str) -> None:
    """Raise :class:`DataError` unless ``dataset`` is one of :data:`DATASETS`."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; valid choices: {', '.join(map(repr, DATASETS))}")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lightning_afterkernel``, or ``~/.cache/lightning_afterkernel``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_afterkernel"


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an unsigned-byte idx file (gzipped when the name ends in ``.gz``) into a writable uint8 array.

    Header: two zero bytes, type byte 0x08, the number of dimensions d, then d big-endian uint32 sizes.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = bytearray(f.read())
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read idx file {path}: {e}; delete it and download it again") from e
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not an unsigned-byte idx file (magic number {bytes(data[:4]).hex()!r})")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path} is truncated: its idx header announces {ndim} dimensions")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) - offset != int(np.prod(shape)):
        raise DataError(
            f"{path}: the idx header announces shape {shape} ({int(np.prod(shape))} bytes) "
            f"but the file holds {len(data) - offset} data bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def locate_split(
    dataset: str,
    root: str | Path,
    train: bool,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> list[Path]:
    """The files holding one split, downloading them through torchvision when missing and ``download``.

    Returns the files to read: MNIST ``[images, labels]``, CIFAR-10 ``[npz]`` or the pickle batches.
    """
    check_dataset(dataset)
    root = Path(root).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    bases = [root] if cache == root else [root, cache]
    found = _find(dataset, bases, train)
    if found is None and download:
        _download(dataset, root if _is_writable(root) else cache, train)
        found = _find(dataset, bases, train)
    if found is None:
        split = "train" if train else "test"
        folders = sorted({str(files[0].parent) for base in bases for files in _layouts(dataset, base, train)})
        if dataset == "mnist":
            expected = " and ".join(f"{name}[.gz]" for name in _MNIST_FILES[train])
        else:
            expected = f"{split}.npz (arrays 'images', 'labels') or torchvision's cifar-10-batches-py/"
        raise DataError(
            f"no {dataset} {split} files found: looked in {', '.join(folders)} for {expected}. "
            f"Pass download=True, or a root holding the files."
        )
    return found


def load_split(
    dataset: str,
    root: str | Path,
    train: bool,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one official split: images uint8 N x H x W x C, labels int64 class ids (all ten classes
    for MNIST and torchvision's CIFAR-10 layout; whatever classes an npz holds).

    See the module docstring for the layouts searched and where downloads go.
    """
    files = locate_split(dataset, root, train, download=download, cache_dir=cache_dir)
    if dataset == "mnist":
        return _read_mnist(*files)
    if files[0].suffix == ".npz":
        return _read_cifar_npz(files[0])
    return _read_cifar_batches(files)


def load_bundled_mnist(train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The small real MNIST 3-vs-8 subset shipped in the package (see ``bundled/PROVENANCE.md``).

    Returns images uint8 N x 28 x 28 x 1 and labels int64 (the digits 3 and 8).
    """
    split = "train" if train else "test"
    try:
        with np.load(BUNDLED_MNIST) as z:
            images, labels = z[f"x_{split}"], z[f"y_{split}"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(
            f"the bundled MNIST subset {BUNDLED_MNIST} is missing or unreadable ({e}); "
            f"reinstall lightning-afterkernel, or pass a root holding MNIST"
        ) from e
    return _checked(BUNDLED_MNIST, images[..., None], labels, IMAGE_SHAPES["mnist"])


def _layouts(dataset: str, base: Path, train: bool) -> list[list[Path]]:
    """Every set of files that can hold the split under ``base``, in search order."""
    if dataset == "mnist":
        dirs = [base / "MNIST" / "raw", base / "mnist" / "MNIST" / "raw"]
        return [[d / (name + ext) for name in _MNIST_FILES[train]] for d in dirs for ext in (".gz", "")]
    dirs = [base, base / "cifar10"]
    npz = [[d / ("train.npz" if train else "test.npz")] for d in dirs]
    return npz + [[d / "cifar-10-batches-py" / b for b in _CIFAR_BATCHES[train]] for d in dirs]


def _find(dataset: str, bases: list[Path], train: bool) -> list[Path] | None:
    for base in bases:
        for files in _layouts(dataset, base, train):
            if all(f.is_file() for f in files):
                return files
    return None


def _is_writable(path: Path) -> bool:
    """Whether ``path`` (or its nearest existing ancestor, when it does not exist yet) is writable."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK)


def _download(dataset: str, target: Path, train: bool) -> None:
    import torchvision.datasets

    cls = torchvision.datasets.MNIST if dataset == "mnist" else torchvision.datasets.CIFAR10
    try:
        cls(str(target), train=train, download=True)
    except (RuntimeError, OSError) as e:
        raise DataError(f"downloading {dataset} into {target} failed: {e}") from e


def _read_mnist(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected N x 28 x 28 images, got shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected a 1-D label array, got shape {labels.shape}")
    return _checked(images_path, images[..., None], labels, IMAGE_SHAPES["mnist"])


def _read_cifar_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(
            f"cannot read {path} ({e}); it must be an npz with arrays 'images' (uint8 N x 32 x 32 x 3) "
            f"and 'labels' (class ids)"
        ) from e
    return _checked(path, images, labels, IMAGE_SHAPES["cifar10"])


def _read_cifar_batches(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            planes = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            images.append(planes.transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"cannot read CIFAR-10 batch {path} ({e}); delete it and download again") from e
    return _checked(paths[0].parent, np.concatenate(images), np.concatenate(labels), IMAGE_SHAPES["cifar10"])


def _checked(
    source: Path, images: np.ndarray, labels: np.ndarray, image_shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate dtype, shapes and label range; return the images and the labels as int64."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != image_shape:
        raise DataError(
            f"{source}: expected uint8 images of shape N x {' x '.join(map(str, image_shape))}, "
            f"got {images.dtype} {images.shape}"
        )
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: {len(images)} images but labels of {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64, copy=False)
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{source}: labels must be class ids 0..9, found {labels.min()}..{labels.max()}")
    return images, labels
