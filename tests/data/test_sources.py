"""Raw loaders: idx parsing, npz and pickle layouts, read-only roots, downloads, the bundled subset."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets

from lightning_afterkernel.data import sources
from lightning_afterkernel.data.sources import (
    BUNDLED_MNIST,
    load_bundled_mnist,
    load_split,
    locate_split,
    read_idx,
)
from lightning_afterkernel.errors import DataError

MNIST_NAMES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array.astype(np.uint8))
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_fake_mnist(raw: Path, n: int = 20, seed: int = 0) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """Synthetic MNIST gz files in torchvision's layout; labels cycle through 0..9."""
    rng = np.random.default_rng(seed)
    out = {}
    for train in (True, False):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(raw / (MNIST_NAMES[train][0] + ".gz"), images)
        write_idx(raw / (MNIST_NAMES[train][1] + ".gz"), labels)
        out[train] = images, labels
    return out


def write_cifar_npz(path: Path, labels: list[int], seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.array(labels, dtype=np.int64))
    return images


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def read_only(tmp_path):
    """Make folders read-only for the test (restored afterwards so tmp_path can be cleaned)."""
    folders = []

    def make(folder: Path) -> Path:
        for p in [folder, *[q for q in folder.rglob("*") if q.is_dir()]]:
            p.chmod(0o555)
            folders.append(p)
        return folder

    yield make
    for p in folders:
        p.chmod(0o755)


# idx parsing


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_read_idx_images_and_labels(tmp_path, suffix):
    images = np.random.default_rng(1).integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    got_images = read_idx(write_idx(tmp_path / f"img{suffix}", images))
    got_labels = read_idx(write_idx(tmp_path / f"lbl{suffix}", labels))
    assert got_images.dtype == np.uint8 and got_images.shape == (3, 4, 5)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    got_images[0, 0, 0] = 1  # writable


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad-magic.gz"
    data = bytearray(idx_bytes(np.zeros((2, 3), np.uint8)))
    data[2] = 0x0D  # float type code
    path.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(DataError, match="bad-magic.gz.*magic"):
        read_idx(path)


def test_read_idx_size_mismatch(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 3), np.uint8))[:-2]))
    with pytest.raises(DataError, match=r"short.gz.*\(4, 3\)"):
        read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))[:60])
    with pytest.raises(DataError, match="cut.gz"):
        read_idx(path)


# MNIST layouts


@pytest.mark.parametrize("sub", ["MNIST/raw", "mnist/MNIST/raw"])
def test_load_split_mnist_layouts(tmp_path, sub):
    data = write_fake_mnist(tmp_path / sub)
    for train in (True, False):
        images, labels = load_split("mnist", tmp_path, train=train, cache_dir=tmp_path / "cache")
        assert images.shape == (20, 28, 28, 1) and images.dtype == np.uint8
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images[..., 0], data[train][0])
        np.testing.assert_array_equal(labels, data[train][1])


def test_load_split_mnist_count_mismatch(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_fake_mnist(raw)
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    with pytest.raises(DataError, match="20 images"):
        load_split("mnist", tmp_path, train=True, cache_dir=tmp_path / "cache")


def test_load_split_mnist_read_only_root(tmp_path, read_only):
    root = tmp_path / "ro"
    data = write_fake_mnist(root / "MNIST" / "raw")
    before = listing(root)
    read_only(root)
    images, labels = load_split("mnist", root, train=False, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(images[..., 0], data[False][0])
    assert listing(root) == before  # nothing extracted
    assert not (tmp_path / "cache").exists()


# CIFAR-10 layouts


@pytest.mark.parametrize("sub", ["", "cifar10"])
def test_load_split_cifar_npz(tmp_path, read_only, sub):
    root = tmp_path / "ro"
    train_images = write_cifar_npz(root / sub / "train.npz", [3, 8, 8, 0])
    write_cifar_npz(root / sub / "test.npz", [8, 3], seed=1)
    before = listing(root)
    read_only(root)
    images, labels = load_split("cifar10", root, train=True, cache_dir=tmp_path / "cache")
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, train_images)
    assert labels.dtype == np.int64 and labels.tolist() == [3, 8, 8, 0]
    assert load_split("cifar10", root, train=False, cache_dir=tmp_path / "cache")[1].tolist() == [8, 3]
    assert listing(root) == before


def test_load_split_cifar_npz_wrong_layout(tmp_path):
    np.savez(tmp_path / "train.npz", images=np.zeros((2, 3, 32, 32), np.uint8), labels=np.array([3, 8]))
    with pytest.raises(DataError, match=r"N x 32 x 32 x 3"):
        load_split("cifar10", tmp_path, train=True, cache_dir=tmp_path / "cache")
    np.savez(tmp_path / "train.npz", pixels=np.zeros((2, 32, 32, 3), np.uint8), labels=np.array([3, 8]))
    with pytest.raises(DataError, match="images"):
        load_split("cifar10", tmp_path, train=True, cache_dir=tmp_path / "cache")
    (tmp_path / "train.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(DataError, match="train.npz"):
        load_split("cifar10", tmp_path, train=True, cache_dir=tmp_path / "cache")


def write_cifar_batches(folder: Path) -> dict[bool, tuple[np.ndarray, list[int]]]:
    """torchvision's cifar-10-batches-py with 2 images per batch: data rows are R, G, B planes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    out = {True: ([], []), False: ([], [])}
    for name, train in [*((f"data_batch_{i}", True) for i in range(1, 6)), ("test_batch", False)]:
        data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=2).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        out[train][0].append(data)
        out[train][1].extend(labels)
    return {k: (np.concatenate(v[0]), v[1]) for k, v in out.items()}


def test_load_split_cifar_torchvision_batches(tmp_path):
    data = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    images, labels = load_split("cifar10", tmp_path, train=True, cache_dir=tmp_path / "cache")
    assert images.shape == (10, 32, 32, 3)
    assert labels.tolist() == data[True][1]
    raw = data[True][0]
    n, c, i, j = 7, 2, 5, 30
    assert images[n, i, j, c] == raw[n, c * 1024 + i * 32 + j]
    test_images, _ = load_split("cifar10", tmp_path, train=False, cache_dir=tmp_path / "cache")
    assert test_images.shape == (2, 32, 32, 3)


# Errors, downloads


def test_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="'mnist', 'cifar10'"):
        load_split("fashion", tmp_path, train=True)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_missing_files_without_download(tmp_path, dataset):
    with pytest.raises(DataError, match="download=True") as info:
        load_split(dataset, tmp_path / "empty", train=True, cache_dir=tmp_path / "cache")
    assert str(tmp_path / "empty") in str(info.value) and str(tmp_path / "cache") in str(info.value)


def test_files_in_cache_dir_are_found(tmp_path):
    write_fake_mnist(tmp_path / "cache" / "MNIST" / "raw", n=10)
    images, _ = load_split("mnist", tmp_path / "root", train=True, cache_dir=tmp_path / "cache")
    assert len(images) == 10


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sources.default_cache_dir() == tmp_path / "lightning_afterkernel"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert sources.default_cache_dir() == Path.home() / ".cache" / "lightning_afterkernel"


class FakeMNIST:
    """Stands in for torchvision.datasets.MNIST(download=True): writes synthetic files where asked."""

    calls: list[tuple[str, bool]] = []

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        FakeMNIST.calls.append((root, train))
        write_fake_mnist(Path(root) / "MNIST" / "raw", n=12)


@pytest.fixture
def fake_mnist(monkeypatch):
    FakeMNIST.calls = []
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    return FakeMNIST


def test_download_into_writable_root(tmp_path, fake_mnist):
    images, _ = load_split("mnist", tmp_path / "new", train=True, download=True, cache_dir=tmp_path / "cache")
    assert fake_mnist.calls == [(str(tmp_path / "new"), True)]
    assert len(images) == 12
    load_split("mnist", tmp_path / "new", train=True, download=True, cache_dir=tmp_path / "cache")
    assert len(fake_mnist.calls) == 1  # present now: no second download


def test_download_with_read_only_root_goes_to_cache(tmp_path, fake_mnist, monkeypatch):
    # The tests may run as root, for whom chmod does not stop writes, so the check itself is replaced.
    monkeypatch.setattr(sources, "_is_writable", lambda path: path != tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    files = locate_split("mnist", tmp_path / "ro", train=False, download=True, cache_dir=tmp_path / "cache")
    assert fake_mnist.calls == [(str(tmp_path / "cache"), False)]
    assert all(f.is_relative_to(tmp_path / "cache") for f in files)
    assert listing(tmp_path / "ro") == []


def test_is_writable(tmp_path):
    assert sources._is_writable(tmp_path / "not" / "yet")
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        assert not sources._is_writable(tmp_path / "ro")


def test_download_failure_is_data_error(tmp_path, monkeypatch):
    def offline(root, train=True, download=False):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError, match="downloading mnist into .*failed"):
        load_split("mnist", tmp_path, train=True, download=True, cache_dir=tmp_path / "cache")


# The bundled subset


def test_bundled_mnist_counts_and_classes():
    for train, n, threes, eights in ((True, 2000, 1042, 958), (False, 500, 275, 225)):
        images, labels = load_bundled_mnist(train)
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        assert labels.dtype == np.int64
        assert ((labels == 3).sum(), (labels == 8).sum()) == (threes, eights)
    assert BUNDLED_MNIST.stat().st_size < 600_000


def test_bundled_mnist_indices():
    with np.load(BUNDLED_MNIST) as z:
        for split, size in (("train", 60_000), ("test", 10_000)):
            idx = z[f"{split}_indices"]
            assert len(idx) == len(z[f"y_{split}"])
            assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < size


@pytest.mark.real_data
def test_bundled_mnist_matches_official_files(shared_data):
    with np.load(BUNDLED_MNIST) as z:
        for split, train in (("train", True), ("test", False)):
            images, labels = load_split("mnist", shared_data, train=train)
            idx = z[f"{split}_indices"]
            np.testing.assert_array_equal(z[f"x_{split}"], images[idx, :, :, 0])
            np.testing.assert_array_equal(z[f"y_{split}"], labels[idx])


@pytest.mark.real_data
def test_real_mnist_and_cifar_counts(shared_data):
    train_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    for train, counts in ((True, train_counts), (False, test_counts)):
        images, labels = load_split("mnist", shared_data, train=train)
        assert images.shape == (sum(counts), 28, 28, 1)
        assert np.bincount(labels, minlength=10).tolist() == counts
    for train, per_class in ((True, 5000), (False, 1000)):
        images, labels = load_split("cifar10", shared_data, train=train)
        assert images.shape == (2 * per_class, 32, 32, 3)
        assert np.bincount(labels, minlength=10)[[3, 8]].tolist() == [per_class, per_class]
