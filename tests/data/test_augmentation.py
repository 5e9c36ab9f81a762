"""BinaryPairDataModule augmentation: training loader only, the right transform, seeded, workers, arguments."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset
from torchvision.transforms.v2 import functional as TF

from lightning_afterkernel.data import BinaryPairDataModule
from lightning_afterkernel.data.augmentation import AugmentedDataset
from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.invariance import rotate, shift

OFFSETS = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
BILINEAR = TF.InterpolationMode.BILINEAR


def first_batch(dm: BinaryPairDataModule, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return next(iter(dm.train_dataloader()))


def make(**kwargs) -> BinaryPairDataModule:
    dm = BinaryPairDataModule(train_subset=256, shuffle=False, batch_size=64, **kwargs)
    dm.setup("fit")
    return dm


def test_no_augmentation_by_default():
    dm = make()
    assert dm.augmentation is None
    assert isinstance(dm.train_dataloader().dataset, TensorDataset)
    x, _ = first_batch(dm, 0)
    assert torch.equal(x, dm.tensors("train")[0][:64])


def test_only_the_training_loader_is_augmented_and_labels_are_kept():
    dm = make(rotation_degrees=15.0, shift_pixels=1)
    original_x, original_y = dm.tensors("train")
    frozen = original_x.clone()
    assert isinstance(dm.train_dataloader().dataset, AugmentedDataset)
    x, y = first_batch(dm, 0)
    assert torch.equal(y, original_y[:64])
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert (x - original_x[:64]).flatten(1).abs().amax(1).gt(1e-3).sum() >= 60  # nearly every image changed
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert loader.dataset is dm.test_dataset
    assert torch.equal(next(iter(dm.val_dataloader()))[0], dm.tensors("test")[0][:64])
    assert torch.equal(dm.tensors("train")[0], frozen)  # the kernels' tensors stay unaugmented


def test_shift_moves_each_image_by_at_most_one_pixel_per_axis():
    dm = make(shift_pixels=1)
    originals = dm.tensors("train")[0]
    torch.manual_seed(1)
    offsets = []
    for i, (x, _) in enumerate(dm.train_dataloader()):
        candidates = torch.stack([shift(originals[64 * i : 64 * (i + 1)], dx, dy) for dx, dy in OFFSETS])
        error = (candidates - x).flatten(2).abs().amax(2)  # (9 offsets, 64 images)
        assert (error.amin(0) < 1e-5).all()  # every image is exactly one of the nine shifts
        offsets += [OFFSETS[k] for k in error.argmin(0).tolist()]
    share_still = sum(dx == 0 for dx, _ in offsets) / len(offsets)
    assert 0.4 < share_still < 0.6  # round(U(-1, 1)): 0 with probability 1/2
    assert {dx for dx, _ in offsets} == {-1, 0, 1} and {dy for _, dy in offsets} == {-1, 0, 1}


def test_rotation_stays_within_the_range():
    dm = make(rotation_degrees=15.0)
    x, _ = first_batch(dm, 2)
    originals = dm.tensors("train")[0][:64]
    degrees = torch.linspace(-20, 20, 801)
    error = torch.stack(
        [(rotate(originals, math.radians(a), "bilinear") - x).flatten(1).abs().amax(1) for a in degrees]
    )
    best = degrees[error.argmin(0)]
    assert (error.amin(0) < 0.05).all()  # each image is a rotation of its original
    assert best.abs().max() <= 15.0 and best.abs().max() > 10.0 and best.std() > 5.0  # spread over +-15 degrees


def test_zoom_scales_about_the_centre_within_the_range():
    dm = make(zoom=0.2)
    x, _ = first_batch(dm, 3)
    originals = dm.tensors("train")[0][:64]
    scales = torch.linspace(0.6, 1.4, 401)
    error = torch.stack([(scaled(originals, float(s)) - x).flatten(1).abs().amax(1) for s in scales])
    best = scales[error.argmin(0)]
    assert (error.amin(0) < 0.05).all()  # each image is a centred zoom of its original
    assert 0.8 <= best.min() < 0.85 and 1.15 < best.max() <= 1.2  # spread over 1 +- 0.2


def scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=scale, shear=[0.0, 0.0], interpolation=BILINEAR)


def test_augmentation_is_seeded_also_with_workers():
    dm = make(rotation_degrees=15.0, shift_pixels=1, zoom=0.1)
    a, b, c = first_batch(dm, 7)[0], first_batch(dm, 7)[0], first_batch(dm, 8)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    workers = make(rotation_degrees=15.0, num_workers=2)
    d, e = first_batch(workers, 7)[0], first_batch(workers, 7)[0]
    assert torch.equal(d, e) and not torch.allclose(d, workers.tensors("train")[0][:64], atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rotation_degrees": -1.0}, "rotation_degrees=-1.0"),
        ({"rotation_degrees": 181}, "0 <= rotation_degrees <= 180"),
        ({"rotation_degrees": float("nan")}, "rotation_degrees=nan"),
        ({"rotation_degrees": True}, "number of degrees"),
        ({"shift_pixels": -1}, "shift_pixels=-1"),
        ({"shift_pixels": 28}, "shift_pixels < 28"),
        ({"shift_pixels": 1.5}, "whole number"),
        ({"zoom": 1.0}, "0 <= zoom < 1"),
        ({"zoom": -0.1}, "zoom=-0.1"),
    ],
)
def test_augmentation_argument_errors(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        BinaryPairDataModule(**kwargs)


def test_augmentation_from_yaml_config_and_in_hparams():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(BinaryPairDataModule, "data")
    cfg = parser.parse_string("data:\n  rotation_degrees: 15\n  shift_pixels: 1\n  zoom: 0.05\n")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse >= 4.49
    dm = instantiate(cfg).data
    assert dm.hparams["rotation_degrees"] == 15 and dm.hparams["shift_pixels"] == 1 and dm.hparams["zoom"] == 0.05
    assert list(dm.augmentation.degrees) == [-15.0, 15.0] and list(dm.augmentation.scale) == [0.95, 1.05]
    assert [t * 28 for t in dm.augmentation.translate] == [1.0, 1.0]
