"""Training-time augmentation for the image data modules (``BinaryPairDataModule``, ``ImageClassDataModule``): one
random affine map per image (rotation, whole-pixel shift, zoom) with torchvision.transforms.v2."""

from __future__ import annotations

import math

from torch import Tensor
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms import v2

from lightning_afterkernel.errors import ConfigurationError


def random_affine(
    rotation_degrees: float, shift_pixels: int, zoom: float, image_size: tuple[int, int]
) -> v2.RandomAffine | None:
    """``v2.RandomAffine`` drawing, per image, an angle uniform in [-rotation_degrees, rotation_degrees], a shift
    of round(U(-s, s)) whole pixels along each axis (s = ``shift_pixels``; for s = 1: -1, 0, +1 with
    probabilities 1/4, 1/2, 1/4) and a scale uniform in [1 - zoom, 1 + zoom], resampled once, bilinearly, with
    zero fill. ``None`` when all three are 0 (no augmentation). Raises :class:`ConfigurationError` for values
    out of range: ``0 <= rotation_degrees <= 180``, ``0 <= shift_pixels < min(image_size)``, ``0 <= zoom < 1``.
    """
    height, width = image_size
    if isinstance(rotation_degrees, bool) or not isinstance(rotation_degrees, int | float):
        raise ConfigurationError(f"rotation_degrees={rotation_degrees!r}; give a number of degrees in [0, 180].")
    if not (math.isfinite(rotation_degrees) and 0 <= rotation_degrees <= 180):
        raise ConfigurationError(
            f"rotation_degrees={rotation_degrees}; use 0 <= rotation_degrees <= 180 (15 in the paper)."
        )
    if (
        isinstance(shift_pixels, bool)
        or not isinstance(shift_pixels, int)
        or not 0 <= shift_pixels < min(height, width)
    ):
        raise ConfigurationError(
            f"shift_pixels={shift_pixels!r}; use a whole number of pixels, 0 <= shift_pixels < {min(height, width)} "
            "(1 in the paper)."
        )
    if isinstance(zoom, bool) or not isinstance(zoom, int | float) or not 0 <= zoom < 1:
        raise ConfigurationError(f"zoom={zoom!r}; use 0 <= zoom < 1 (scale drawn from [1 - zoom, 1 + zoom]).")
    if rotation_degrees == 0 and shift_pixels == 0 and zoom == 0:
        return None
    return v2.RandomAffine(
        degrees=float(rotation_degrees),
        translate=(shift_pixels / width, shift_pixels / height) if shift_pixels else None,
        scale=(1 - zoom, 1 + zoom) if zoom else None,
        interpolation=v2.InterpolationMode.BILINEAR,
        fill=0,
    )


class AugmentedDataset(Dataset):
    """``dataset[i]`` = (image, label) with ``transform`` applied to the image, drawn afresh at every access from
    torch's global RNG: in a DataLoader worker that RNG is seeded per worker from the loader's base seed, so
    ``pytorch_lightning.seed_everything`` (or ``torch.manual_seed``) makes the augmented epochs reproducible."""

    def __init__(self, dataset: TensorDataset, transform: v2.Transform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self.dataset[index]
        return self.transform(image), label
