"""The image transforms of Long's after-kernel paper, exact and parameterised, on image batches (n, C, H, W).

Each transform maps a batch to a batch of the same shape, dtype and device, and acts on every image and channel
alike. They follow the author's TensorFlow code (google-research ``after_kernel/run_ak_experiment.py``):

- globalness: :func:`quadrant_swap` (its ``calc_swap_inv``);
- shift: :func:`shift` 1 px right and 1 px down, zero fill (``tfa.image.translate``);
- rotation: :func:`rotate` by +0.25 and -0.25 rad, nearest neighbour, zero fill (``tfa.image.rotate``'s defaults);
- zoom: :func:`zoom`, ``tf.image.central_crop(x, 13/14)`` resized back with ``tf.image.resize`` (bilinear,
  half-pixel centres).

:data:`PAPER_FAMILIES` groups them as the paper's scores do: a score is the mean over its family's transforms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_afterkernel.errors import ConfigurationError

Transform = Callable[[Tensor], Tensor]
"""A map from a batch of images (n, C, H, W) to a batch of the same shape."""

Interpolation = Literal["nearest", "bilinear"]


def check_images(x: Tensor) -> tuple[int, int]:
    """Raise :class:`ConfigurationError` unless ``x`` is a floating batch of images (n, C, H, W), n >= 1;
    return (H, W)."""
    if not isinstance(x, Tensor):
        raise ConfigurationError(f"x must be a torch.Tensor of images (n, C, H, W); got {type(x).__name__}.")
    if x.ndim != 4 or 0 in x.shape:
        raise ConfigurationError(
            f"x must be a non-empty batch of images of shape (n, C, H, W); got shape {tuple(x.shape)}. "
            "Add a batch dimension with x.unsqueeze(0) or a channel dimension with x.unsqueeze(1)."
        )
    if not x.is_floating_point():
        raise ConfigurationError(
            f"x must hold floating-point pixels; got dtype {x.dtype}. Convert it, e.g. x.float() / 255."
        )
    return x.shape[-2], x.shape[-1]


def quadrant_swap(x: Tensor) -> Tensor:
    """Swap the upper-left and lower-right quadrants (H/2 x W/2 each: 14 x 14 on MNIST, 16 x 16 on CIFAR-10);
    the other two quadrants are unchanged. Its own inverse. H and W must be even."""
    h, w = check_images(x)
    if h % 2 or w % 2:
        raise ConfigurationError(
            f"quadrant_swap needs an even height and width, to cut the image into four equal quadrants; got "
            f"{h} x {w}. Pad or crop the images to even sizes first."
        )
    h2, w2 = h // 2, w // 2
    out = x.clone()
    out[..., :h2, :w2] = x[..., h2:, w2:]
    out[..., h2:, w2:] = x[..., :h2, :w2]
    return out


def shift(x: Tensor, dx: int = 1, dy: int = 0) -> Tensor:
    """Translate by whole pixels with zero fill: ``out[..., i, j] = x[..., i - dy, j - dx]`` (0 outside the image).

    ``dx > 0`` moves the content right, ``dy > 0`` down; ``tfa.image.translate(x, [dx, dy])``.
    """
    h, w = check_images(x)
    for name, value, side in (("dx", dx, w), ("dy", dy, h)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"shift: {name} must be an int number of pixels; got {value!r}.")
        if abs(value) >= side:
            raise ConfigurationError(
                f"shift: |{name}| = {abs(value)} would move the whole {h} x {w} image out of the frame; use "
                f"|{name}| < {side}."
            )
    out = torch.zeros_like(x)
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def rotate(x: Tensor, angle: float, interpolation: Interpolation = "nearest") -> Tensor:
    r"""Rotate counterclockwise (as displayed, rows downwards) by ``angle`` radians about the image centre,
    with zero fill: ``tfa.image.rotate(x, angle)``, whose defaults the paper used.

    Output pixel (i, j) reads the input at :math:`x_s = c_x + \cos a\,(j - c_x) - \sin a\,(i - c_y)`,
    :math:`y_s = c_y + \sin a\,(j - c_x) + \cos a\,(i - c_y)`, with :math:`(c_x, c_y) = ((W-1)/2, (H-1)/2)`
    (TensorFlow's projective transform). ``"nearest"`` rounds halves away from zero (``std::round``, as
    TensorFlow); ``"bilinear"`` interpolates the four neighbours. Points outside the image read 0. A multiple
    of pi/2 on a square image is an exact ``torch.rot90``.
    """
    h, w = check_images(x)
    if not isinstance(angle, int | float) or isinstance(angle, bool) or not math.isfinite(angle):
        raise ConfigurationError(f"rotate: angle must be a finite number of radians; got {angle!r}.")
    if interpolation not in ("nearest", "bilinear"):
        raise ConfigurationError(f"rotate: interpolation must be 'nearest' or 'bilinear'; got {interpolation!r}.")
    cos, sin = math.cos(angle), math.sin(angle)
    if abs(cos) < 1e-12:  # exact multiples of pi/2: no rounding noise at the grid points
        cos = 0.0
    if abs(sin) < 1e-12:
        sin = 0.0
    i = torch.arange(h, dtype=torch.float64, device=x.device)[:, None] - (h - 1) / 2
    j = torch.arange(w, dtype=torch.float64, device=x.device)[None, :] - (w - 1) / 2
    xs = (w - 1) / 2 + cos * j - sin * i
    ys = (h - 1) / 2 + sin * j + cos * i
    if interpolation == "nearest":
        return _gather(x, _round_half_away(ys), _round_half_away(xs))
    x0, y0 = xs.floor(), ys.floor()
    fx, fy = (xs - x0).to(x.dtype), (ys - y0).to(x.dtype)
    x0, y0 = x0.long(), y0.long()
    return (
        _gather(x, y0, x0) * (1 - fy) * (1 - fx)
        + _gather(x, y0, x0 + 1) * (1 - fy) * fx
        + _gather(x, y0 + 1, x0) * fy * (1 - fx)
        + _gather(x, y0 + 1, x0 + 1) * fy * fx
    )


def zoom(x: Tensor, crop_fraction: float = 13 / 14) -> Tensor:
    """Zoom in: crop the centre and resize it back to H x W, bilinearly.

    The crop is ``tf.image.central_crop(x, crop_fraction)``: ``top = int((H - H * crop_fraction) / 2)`` rows
    are cut at the top and at the bottom (likewise columns), so 13/14 keeps 26 x 26 of 28 x 28 and 30 x 30 of
    32 x 32, and leaves images under 28 px as they are. The resize is ``tf.image.resize`` (bilinear,
    half-pixel centres, no antialiasing), i.e. ``F.interpolate(mode="bilinear", align_corners=False)``.
    ``crop_fraction=1`` is the identity.
    """
    h, w = check_images(x)
    if not isinstance(crop_fraction, int | float) or isinstance(crop_fraction, bool) or not 0 < crop_fraction <= 1:
        raise ConfigurationError(f"zoom: crop_fraction must be in (0, 1]; got {crop_fraction!r}.")
    top, left = int((h - h * crop_fraction) / 2), int((w - w * crop_fraction) / 2)
    return F.interpolate(x[..., top : h - top, left : w - left], size=(h, w), mode="bilinear", align_corners=False)


def patch_shuffle(x: Tensor, block_size: int, seed: int = 0) -> Tensor:
    """Cut each image into non-overlapping ``block_size`` x ``block_size`` blocks and permute them: the block at
    position k (row-major) becomes input block ``perm[k]``. One permutation for the whole batch, drawn from
    ``torch.Generator().manual_seed(seed)`` and redrawn until it is not the identity. H and W must be multiples
    of ``block_size`` with at least two blocks. A generalisation of :func:`quadrant_swap`'s test of locality.
    """
    h, w = check_images(x)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigurationError(f"patch_shuffle: block_size must be a positive int; got {block_size!r}.")
    if h % block_size or w % block_size:
        raise ConfigurationError(
            f"patch_shuffle: block_size={block_size} must divide the image height and width ({h} x {w}); "
            "pick a common divisor."
        )
    rows, cols = h // block_size, w // block_size
    if rows * cols < 2:
        raise ConfigurationError(
            f"patch_shuffle: block_size={block_size} makes a single block of the {h} x {w} image, which no "
            "permutation moves; use a smaller block_size."
        )
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(rows * cols, generator=generator)
    while bool((perm == torch.arange(rows * cols)).all()):
        perm = torch.randperm(rows * cols, generator=generator)
    n, c = x.shape[:2]
    blocks = x.reshape(n, c, rows, block_size, cols, block_size).transpose(3, 4).reshape(n, c, rows * cols, -1)
    blocks = blocks[:, :, perm.to(x.device)]
    return blocks.reshape(n, c, rows, cols, block_size, block_size).transpose(3, 4).reshape(x.shape)


PAPER_FAMILIES: Mapping[str, tuple[Transform, ...]] = MappingProxyType(
    {
        "globalness": (quadrant_swap,),
        "shift": (partial(shift, dx=1, dy=0), partial(shift, dx=0, dy=1)),
        "rotation": (partial(rotate, angle=0.25), partial(rotate, angle=-0.25)),
        "zoom": (partial(zoom, crop_fraction=13 / 14),),
    }
)
"""The paper's four scores as transform families; a score is the mean over its family's transforms."""


def transform_name(transform: Transform) -> str:
    """A readable name, e.g. ``shift(dx=1, dy=0)`` for a :func:`functools.partial`."""
    if isinstance(transform, partial):
        arguments = [repr(a) for a in transform.args] + [f"{k}={v!r}" for k, v in transform.keywords.items()]
        return f"{transform_name(transform.func)}({', '.join(arguments)})"
    return getattr(transform, "__name__", repr(transform))


def _round_half_away(t: Tensor) -> Tensor:
    return (t.sign() * (t.abs() + 0.5).floor()).long()


def _gather(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``out[..., i, j] = x[..., rows[i, j], cols[i, j]]``, and 0 where that index is outside the image."""
    h, w = x.shape[-2:]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).flatten()
    values = x.flatten(-2)[..., index].unflatten(-1, (h, w))
    return torch.where(inside, values, torch.zeros((), dtype=x.dtype, device=x.device))
