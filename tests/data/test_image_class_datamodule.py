"""ImageClassDataModule: classes and labels in the order asked, subsets, class names, sources, errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets

from lightning_afterkernel.data import BinaryPairDataModule, ImageClassDataModule, load_split
from lightning_afterkernel.errors import ConfigurationError, DataError

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_mnist(raw: Path, n: int, seed: int) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """Random MNIST-shaped gz files in torchvision's layout, labels cycling through 0..9."""
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for train, prefix in ((True, "train"), (False, "t10k")):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for name, array in ((f"{prefix}-images-idx3-ubyte.gz", images), (f"{prefix}-labels-idx1-ubyte.gz", labels)):
            header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (raw / name).write_bytes(gzip.compress(header + array.tobytes()))
        out[train] = images, labels.astype(np.int64)
    return out


def write_cifar_batches(folder: Path, train: bool, n_per_batch: int = 20) -> None:
    """torchvision's cifar-10-batches-py pickles, labels cycling through 0..9."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(int(train))
    for name in [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        batch = {"data": data, "labels": [i % 10 for i in range(n_per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))


def write_cifar_npz(path: Path, labels: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.array(labels, dtype=np.int64))


@pytest.fixture
def mnist_root(tmp_path) -> tuple[Path, dict[bool, tuple[np.ndarray, np.ndarray]]]:
    raw = write_mnist(tmp_path / "mnist" / "MNIST" / "raw", n=200, seed=0)
    return tmp_path / "mnist", raw


def test_all_ten_classes_by_default(mnist_root):
    root, raw = mnist_root
    dm = ImageClassDataModule(root=str(root))
    assert dm.num_classes == 10 and dm.classes == list(range(10))
    assert dm.class_names == [str(d) for d in range(10)]
    assert dm.input_shape == (1, 28, 28)
    for split, train in (("train", True), ("test", False)):
        x, y = dm.tensors(split)
        images, labels = raw[train]
        assert torch.equal(y, torch.from_numpy(labels))  # all ten: the label is the digit
        assert torch.equal(x, torch.from_numpy(images)[:, None].float() / 255)


def test_labels_follow_the_order_of_classes(mnist_root):
    root, raw = mnist_root
    dm = ImageClassDataModule(root=str(root), classes=[7, 2, 5])
    assert dm.num_classes == 3 and dm.classes == [7, 2, 5] and dm.class_names == ["7", "2", "5"]
    x, y = dm.tensors("train")
    images, digits = raw[True]
    keep = np.isin(digits, [7, 2, 5])
    assert torch.equal(x, torch.from_numpy(images[keep])[:, None].float() / 255)
    assert y.tolist() == [{7: 0, 2: 1, 5: 2}[d] for d in digits[keep]]
    assert dm.hparams["classes"] == [7, 2, 5]


def test_two_classes_equal_the_binary_module_draw_for_draw():
    """The shared code: classes [minus, plus] give the binary module's images, labels and subsets."""
    kwargs = {"train_subset": 300, "test_subset": 120, "val_size": 50, "subset_seed": 4}
    multi = ImageClassDataModule(classes=[3, 8], **kwargs)
    binary = BinaryPairDataModule(plus_class=8, minus_class=3, **kwargs)
    assert binary.classes == [3, 8] and binary.class_names == ["3", "8"] and binary.num_classes == 2
    for split in ("train", "val", "test"):
        for a, b in zip(multi.tensors(split), binary.tensors(split), strict=True):
            assert torch.equal(a, b)
    swapped = ImageClassDataModule(classes=[8, 3], **kwargs)
    assert torch.equal(swapped.tensors("train")[1], 1 - multi.tensors("train")[1])


def test_subsets_are_seeded_and_hold_every_class(mnist_root):
    root, _ = mnist_root
    a = ImageClassDataModule(root=str(root), train_subset=120, test_subset=60, subset_seed=1)
    b = ImageClassDataModule(root=str(root), train_subset=120, test_subset=60, subset_seed=1)
    c = ImageClassDataModule(root=str(root), train_subset=120, test_subset=60, subset_seed=2)
    for split, n in (("train", 120), ("test", 60)):
        assert len(a.tensors(split)[1]) == n
        assert torch.equal(a.tensors(split)[0], b.tensors(split)[0])
        assert not torch.equal(a.tensors(split)[0], c.tensors(split)[0])
        assert set(a.tensors(split)[1].tolist()) == set(range(10))


def test_a_split_missing_a_class_is_refused(mnist_root):
    root, _ = mnist_root
    dm = ImageClassDataModule(root=str(root), test_subset=5)
    match = r"test split of mnist \(all ten classes\).*only [1-5] of its 10 classes \(none of classes"
    with pytest.raises(DataError, match=match):
        dm.setup("fit")


def test_cifar10_torchvision_download_gives_every_class(tmp_path, monkeypatch):
    calls = []

    def fake_cifar10(root: str, train: bool = True, download: bool = False) -> None:
        calls.append((Path(root), train))
        write_cifar_batches(Path(root) / "cifar-10-batches-py", train)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    root = tmp_path / "cache"
    dm = ImageClassDataModule(dataset="cifar10", root=str(root), download=True, classes=[9, 0, 3])
    dm.prepare_data()
    assert calls == [(root, True), (root, False)]
    assert dm.class_names == ["truck", "airplane", "cat"] and dm.input_shape == (3, 32, 32)
    x, y = dm.tensors("train")
    raw_x, raw_y = load_split("cifar10", root, train=True)
    keep = np.isin(raw_y, [9, 0, 3])
    assert x.shape == (int(keep.sum()), 3, 32, 32)
    assert y.tolist() == [{9: 0, 0: 1, 3: 2}[c] for c in raw_y[keep]]
    assert torch.equal(x, torch.from_numpy(raw_x[keep]).permute(0, 3, 1, 2).float() / 255)
    assert ImageClassDataModule(dataset="cifar10", root=str(root)).class_names == CIFAR_NAMES


def test_classes_an_npz_lacks_fail_with_the_fix(tmp_path):
    """An npz holding only cats and ships (as ../shared/data) cannot serve ten classes: the error says what to do."""
    for split in ("train", "test"):
        write_cifar_npz(tmp_path / "data" / "cifar10" / f"{split}.npz", [3, 8, 8, 3])
    dm = ImageClassDataModule(dataset="cifar10", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "classes 0 (airplane), 1 (automobile), 2 (bird), 4 (deer)" in message
    assert "holds classes [3, 8]" in message and "train.npz holds only these classes" in message
    assert "download=True" in message and "without train.npz/test.npz" in message and "torchvision" in message
    cats_and_ships = ImageClassDataModule(dataset="cifar10", root=str(tmp_path / "data"), classes=[8, 3])
    assert cats_and_ships.tensors("train")[1].tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dataset": "svhn", "root": "x"}, DataError, "'mnist', 'cifar10'"),
        ({"classes": [1, 10], "root": "x"}, DataError, r"classes=\[1, 10\]: 10 is not a mnist class id"),
        ({"classes": ["cat", "ship"], "root": "x"}, DataError, "'cat' is not a mnist class id"),
        ({"classes": [True, 2], "root": "x"}, DataError, "True is not"),
        ({"classes": "38", "root": "x"}, DataError, "give a list"),
        ({"classes": [3, 8, 3], "root": "x"}, ConfigurationError, r"repeats \[3\]"),
        ({"classes": [3], "root": "x"}, ConfigurationError, "at least two classes"),
        ({}, DataError, r"bundled .* cannot serve mnist \(all ten classes\); pass root"),
        ({"classes": [3, 8, 1]}, DataError, "pass root"),
        ({"dataset": "cifar10", "classes": [3, 8]}, DataError, "pass root"),
        ({"classes": [3, 8], "batch_size": 0}, ConfigurationError, "batch_size=0"),
        ({"classes": [3, 8], "train_subset": 0}, ConfigurationError, "train_subset=0"),
        ({"classes": [3, 8], "rotation_degrees": 200}, ConfigurationError, "rotation_degrees"),
    ],
)
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ImageClassDataModule(**kwargs)


def test_augmentation_applies_to_the_training_loader_only():
    dm = ImageClassDataModule(classes=[3, 8], train_subset=64, test_subset=32, rotation_degrees=15, shuffle=False)
    assert dm.augmentation is not None
    x_aug, _ = next(iter(dm.train_dataloader()))
    x_val, _ = next(iter(dm.val_dataloader()))
    assert not torch.equal(x_aug, dm.tensors("train")[0][:32])
    assert torch.equal(x_val, dm.tensors("test")[0][:32])


@pytest.mark.real_data
def test_real_mnist_all_ten_classes(shared_data):
    dm = ImageClassDataModule(root=str(shared_data))
    for split, train, n in (("train", True, 60_000), ("test", False, 10_000)):
        x, y = dm.tensors(split)
        _, digits = load_split("mnist", shared_data, train)
        assert x.shape == (n, 1, 28, 28)
        assert torch.equal(torch.bincount(y, minlength=10), torch.from_numpy(np.bincount(digits, minlength=10)))


@pytest.mark.real_data
def test_real_cifar10_npz_refuses_ten_classes(shared_data, tmp_path):
    dm = ImageClassDataModule(dataset="cifar10", root=str(shared_data), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="holds classes \\[3, 8\\].*download=True"):
        dm.setup("fit")
