"""BinaryPairDataModule: label mapping, pixel scaling, subsets, validation split, loaders, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from torch.utils.data import RandomSampler, SequentialSampler

from lightning_afterkernel.data import BinaryPairDataModule, load_bundled_mnist
from lightning_afterkernel.errors import ConfigurationError, DataError


def write_cifar_npz(path: Path, labels: list[int], seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.array(labels, dtype=np.int64))
    return images


def row_ids(x: torch.Tensor) -> list[str]:
    """One hash per example, to follow examples across subsets."""
    return [hashlib.md5(row.numpy().tobytes()).hexdigest() for row in x]


@pytest.fixture(scope="module")
def bundled() -> BinaryPairDataModule:
    dm = BinaryPairDataModule()
    dm.setup("fit")
    return dm


def test_properties_before_setup():
    mnist = BinaryPairDataModule()
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 2
    assert mnist.train_dataset is None and mnist.val_dataset is None and mnist.test_dataset is None
    cifar = BinaryPairDataModule(dataset="cifar10", root="/nonexistent")
    assert cifar.input_shape == (3, 32, 32)
    assert cifar.hparams["dataset"] == "cifar10"


def test_bundled_counts_labels_and_pixels(bundled):
    for split, raw, n, plus in (("train", True, 2000, 958), ("test", False, 500, 225)):
        x, y = bundled.tensors(split)
        images, digits = load_bundled_mnist(raw)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and int(y.sum()) == plus
        assert torch.equal(y, torch.from_numpy(digits == 8).long())  # plus 8 -> 1, minus 3 -> 0
        assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
        assert x.min() == 0 and x.max() == 1
    assert bundled.val_dataset is bundled.test_dataset  # val_size=0: validation set is the test set


def test_swapped_classes_flip_labels(bundled):
    dm = BinaryPairDataModule(plus_class=3, minus_class=8)
    assert torch.equal(dm.tensors("train")[1], 1 - bundled.tensors("train")[1])


def test_cifar_npz_read_only_root_filters_and_maps(tmp_path):
    root = tmp_path / "data"
    labels = [3, 8, 0, 8, 3, 9, 8]
    images = write_cifar_npz(root / "cifar10" / "train.npz", labels)
    write_cifar_npz(root / "cifar10" / "test.npz", [8, 3, 1], seed=1)
    for p in (root, root / "cifar10"):
        p.chmod(0o555)
    try:
        dm = BinaryPairDataModule(dataset="cifar10", root=str(root), cache_dir=str(tmp_path / "cache"))
        x, y = dm.tensors("train")
    finally:
        for p in (root, root / "cifar10"):
            p.chmod(0o755)
    keep = [0, 1, 3, 4, 6]
    assert x.shape == (5, 3, 32, 32)
    assert y.tolist() == [0, 1, 1, 0, 1]
    assert torch.equal(x, torch.from_numpy(images[keep]).permute(0, 3, 1, 2).float() / 255)
    assert dm.tensors("test")[1].tolist() == [1, 0]
    assert sorted(p.name for p in root.rglob("*")) == ["cifar10", "test.npz", "train.npz"]


def test_setup_is_idempotent(bundled):
    first = bundled.train_dataset
    bundled.setup("fit")
    bundled.setup("test")
    assert bundled.train_dataset is first


def test_tensors_sets_up_lazily_and_checks_split():
    dm = BinaryPairDataModule(test_subset=50)
    x, y = dm.tensors("val")
    assert len(x) == len(y) == 50
    with pytest.raises(ConfigurationError, match="'train', 'val', 'test'"):
        dm.tensors("validation")


def test_dataloaders(bundled):
    train = bundled.train_dataloader()
    assert isinstance(train.sampler, RandomSampler) and train.batch_size == 32 and len(train) == 63
    x, y = next(iter(train))
    assert x.shape == (32, 1, 28, 28) and y.dtype == torch.int64
    for loader in (bundled.val_dataloader(), bundled.test_dataloader(), bundled.predict_dataloader()):
        assert isinstance(loader.sampler, SequentialSampler)
        assert loader.dataset is bundled.test_dataset
    dm = BinaryPairDataModule(shuffle=False, batch_size=7, val_size=100)
    assert isinstance(dm.train_dataloader().sampler, SequentialSampler)
    assert dm.val_dataloader().dataset is dm.val_dataset and len(dm.val_dataloader()) == 15


def test_subsets_are_seeded_and_ordered(bundled):
    def draw(seed: int) -> BinaryPairDataModule:
        dm = BinaryPairDataModule(train_subset=300, test_subset=100, subset_seed=seed)
        dm.setup("fit")
        return dm

    a, b, c = draw(0), draw(0), draw(1)
    for split, n in (("train", 300), ("test", 100)):
        assert len(a.tensors(split)[0]) == n
        assert torch.equal(a.tensors(split)[0], b.tensors(split)[0])
        assert torch.equal(a.tensors(split)[1], b.tensors(split)[1])
        assert not torch.equal(a.tensors(split)[0], c.tensors(split)[0])
        position = {h: i for i, h in enumerate(row_ids(bundled.tensors(split)[0]))}
        picked = [position[h] for h in row_ids(a.tensors(split)[0])]
        assert picked == sorted(picked) and len(set(picked)) == n


def test_val_split_is_disjoint_from_train(bundled):
    full = set(row_ids(bundled.tensors("train")[0]))
    dm = BinaryPairDataModule(val_size=300)
    train, val = set(row_ids(dm.tensors("train")[0])), set(row_ids(dm.tensors("val")[0]))
    assert len(train) == 1700 and len(val) == 300
    assert train.isdisjoint(val) and train | val == full
    assert dm.val_dataset is not dm.test_dataset
    sub = BinaryPairDataModule(val_size=300, train_subset=500)
    sub_train, sub_val = set(row_ids(sub.tensors("train")[0])), set(row_ids(sub.tensors("val")[0]))
    assert len(sub_train) == 500 and sub_val == val and sub_train.isdisjoint(sub_val)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dataset": "svhn"}, DataError, "'mnist', 'cifar10'"),
        ({"plus_class": 10}, DataError, "plus_class=10.*0..9"),
        ({"minus_class": -1}, DataError, "minus_class=-1"),
        ({"plus_class": "ship"}, DataError, "plus_class='ship'.*integer 0..9.*8 = ship"),
        ({"minus_class": 3.0}, DataError, "minus_class=3.0.*integer"),
        ({"plus_class": 3}, ConfigurationError, "plus_class == minus_class"),
        ({"dataset": "cifar10"}, DataError, "pass root"),
        ({"plus_class": 1, "minus_class": 7}, DataError, "pass root"),
        ({"batch_size": 0}, ConfigurationError, "batch_size=0"),
        ({"num_workers": -1}, ConfigurationError, "num_workers"),
        ({"train_subset": 0}, ConfigurationError, "train_subset=0"),
        ({"test_subset": -5}, ConfigurationError, "test_subset=-5"),
        ({"val_size": -1}, ConfigurationError, "val_size=-1"),
    ],
)
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        BinaryPairDataModule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_subset": 2001}, "2000 available"),
        ({"train_subset": 1900, "val_size": 101}, "2000 available"),
        ({"val_size": 2000}, "2000 available"),
        ({"test_subset": 501}, "has 500 examples"),
        ({"test_subset": 1}, "test split .* only one class"),
        ({"val_size": 1}, "val split .* only one class"),
    ],
)
def test_subset_errors(kwargs, match):
    dm = BinaryPairDataModule(**kwargs)
    with pytest.raises(DataError, match=match):
        dm.setup("fit")


def test_missing_files_without_download(tmp_path):
    dm = BinaryPairDataModule(root=str(tmp_path / "nothing"), cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()  # download=False: nothing to do
    with pytest.raises(DataError, match=r"nothing.*download=True"):
        dm.setup("fit")


def test_class_absent_from_data(tmp_path):
    write_cifar_npz(tmp_path / "train.npz", [3, 8, 3])
    write_cifar_npz(tmp_path / "test.npz", [3, 8])
    dm = BinaryPairDataModule(dataset="cifar10", root=str(tmp_path), plus_class=1, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"class 1 .*holds classes \[3, 8\]"):
        dm.setup("fit")


def test_prepare_data_downloads_both_splits(tmp_path, monkeypatch):
    calls = []

    def fake_cifar10(root: str, train: bool = True, download: bool = False) -> None:
        calls.append(train)
        write_cifar_npz(Path(root) / ("train.npz" if train else "test.npz"), [3, 8, 8])

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    dm = BinaryPairDataModule(
        dataset="cifar10", root=str(tmp_path / "dl"), download=True, cache_dir=str(tmp_path / "cache")
    )
    dm.prepare_data()
    assert calls == [True, False]
    dm.setup("fit")
    assert len(dm.train_dataset) == 3
    dm.prepare_data()
    assert calls == [True, False]


def test_instantiable_from_yaml_config():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(BinaryPairDataModule, "data")
    cfg = parser.parse_string("data:\n  root: null\n  train_subset: 64\n  val_size: 16\n")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse >= 4.49
    dm = instantiate(cfg).data
    assert isinstance(dm, BinaryPairDataModule) and dm.root is None
    assert len(dm.tensors("train")[0]) == 64 and len(dm.tensors("val")[0]) == 16


@pytest.mark.real_data
def test_real_mnist_3v8_full_sizes(shared_data):
    dm = BinaryPairDataModule(root=str(shared_data))
    for split, n, eights in (("train", 11_982, 5851), ("test", 1_984, 974)):
        x, y = dm.tensors(split)
        assert x.shape == (n, 1, 28, 28)
        assert int(y.sum()) == eights and int((y == 0).sum()) == n - eights  # 6131 / 1010 threes


@pytest.mark.real_data
def test_real_cifar10_cat_ship_full_sizes(shared_data):
    dm = BinaryPairDataModule(dataset="cifar10", root=str(shared_data))
    for split, n in (("train", 10_000), ("test", 2_000)):
        x, y = dm.tensors(split)
        assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32
        assert int(y.sum()) == n // 2
        assert 0 <= x.min() and x.max() <= 1
