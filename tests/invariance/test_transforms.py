"""The paper's image transforms, pixel-exact on small images."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.invariance import (
    PAPER_FAMILIES,
    patch_shuffle,
    quadrant_swap,
    rotate,
    shift,
    transform_name,
    zoom,
)


def images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def tf_rotate_nearest(x: torch.Tensor, angle: float) -> torch.Tensor:
    """tfa.image.rotate, written out: angles_to_projective_transforms, then ImageProjectiveTransformV3 with
    nearest interpolation (std::round) and constant 0 fill, one output pixel at a time."""
    h, w = x.shape[-2:]
    c, s = math.cos(angle), math.sin(angle)
    x_offset = ((w - 1) - (c * (w - 1) - s * (h - 1))) / 2
    y_offset = ((h - 1) - (s * (w - 1) + c * (h - 1))) / 2
    out = torch.zeros_like(x)
    for row in range(h):
        for col in range(w):
            src_x = c * col - s * row + x_offset
            src_y = s * col + c * row + y_offset
            i = int(math.copysign(math.floor(abs(src_y) + 0.5), src_y))
            j = int(math.copysign(math.floor(abs(src_x) + 0.5), src_x))
            if 0 <= i < h and 0 <= j < w:
                out[..., row, col] = x[..., i, j]
    return out


# quadrant swap


def test_quadrant_swap_moves_the_two_quadrants_and_nothing_else():
    x = images(2, 3, 4, 6)
    out = quadrant_swap(x)
    assert torch.equal(out[..., :2, :3], x[..., 2:, 3:])
    assert torch.equal(out[..., 2:, 3:], x[..., :2, :3])
    assert torch.equal(out[..., :2, 3:], x[..., :2, 3:]) and torch.equal(out[..., 2:, :3], x[..., 2:, :3])
    assert not torch.equal(out, x)


@pytest.mark.parametrize(("c", "side", "half"), [(1, 28, 14), (3, 32, 16)])
def test_quadrant_swap_on_paper_sizes_and_twice_is_identity(c, side, half):
    x = images(3, c, side, side)
    out = quadrant_swap(x)
    assert torch.equal(out[..., :half, :half], x[..., half:, half:])
    assert torch.equal(quadrant_swap(out), x)
    assert torch.equal(x, images(3, c, side, side))  # the input is not modified


@pytest.mark.parametrize("shape", [(1, 1, 5, 4), (1, 1, 4, 7)])
def test_quadrant_swap_refuses_odd_sizes(shape):
    with pytest.raises(ConfigurationError, match="even height and width"):
        quadrant_swap(torch.zeros(shape))


# shift


def test_one_pixel_shifts_move_every_pixel_one_place_with_zero_fill():
    x = images(2, 3, 5, 6) + 1.0  # no zero pixels, so the fill is visible
    right, down = shift(x, dx=1, dy=0), shift(x, dx=0, dy=1)
    assert torch.equal(right[..., :, 1:], x[..., :, :-1]) and (right[..., :, 0] == 0).all()
    assert torch.equal(down[..., 1:, :], x[..., :-1, :]) and (down[..., 0, :] == 0).all()
    left_up = shift(x, dx=-2, dy=-1)
    assert torch.equal(left_up[..., :-1, :-2], x[..., 1:, 2:])
    assert (left_up[..., -1, :] == 0).all() and (left_up[..., :, -2:] == 0).all()
    assert torch.equal(shift(x, 0, 0), x)


def test_shift_matches_rolling_with_zero_fill():
    x = images(1, 1, 7, 7)
    for dx, dy in [(1, 0), (0, 1), (-3, 2), (6, -6)]:
        expected = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
        keep = torch.zeros(7, 7, dtype=torch.bool)
        keep[max(dy, 0) : 7 + min(dy, 0), max(dx, 0) : 7 + min(dx, 0)] = True
        assert torch.equal(shift(x, dx, dy), torch.where(keep, expected, 0.0))


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"dx": 5}, r"\|dx\| = 5"), ({"dy": -4}, r"\|dy\| = 4"), ({"dx": 1.0}, "int")]
)
def test_shift_refuses_bad_offsets(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        shift(torch.zeros(1, 1, 4, 5), **kwargs)


# rotation


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_rotation_by_zero_and_by_multiples_of_a_right_angle_is_exact(interpolation):
    x = images(2, 3, 6, 6)
    assert torch.equal(rotate(x, 0.0, interpolation), x)
    assert torch.equal(rotate(x, 2 * math.pi, interpolation), x)
    for k in (1, 2, 3, -1):
        assert torch.equal(rotate(x, k * math.pi / 2, interpolation), torch.rot90(x, k, dims=(-2, -1)))
    odd = images(1, 1, 5, 5)
    assert torch.equal(rotate(odd, math.pi / 2, interpolation), torch.rot90(odd, 1, dims=(-2, -1)))
    wide = images(1, 2, 4, 6)
    assert torch.equal(rotate(wide, math.pi, interpolation), wide.flip(-2, -1))


def test_positive_angles_turn_counterclockwise_as_displayed():
    x = torch.zeros(1, 1, 5, 5)
    x[..., 2, 4] = 1.0  # right of the centre
    out = rotate(x, math.pi / 2)
    assert out[..., 0, 2] == 1.0 and out.sum() == 1.0  # now above the centre


@pytest.mark.parametrize("angle", [0.25, -0.25, 1.0])
def test_rotation_matches_tensorflow_projective_transform_nearest(angle):
    x = images(2, 1, 9, 9, seed=1)
    assert torch.equal(rotate(x, angle), tf_rotate_nearest(x, angle))
    wide = images(1, 1, 6, 10, seed=2)
    assert torch.equal(rotate(wide, angle), tf_rotate_nearest(wide, angle))


def test_bilinear_rotation_matches_grid_sample_through_pixel_centres():
    x = images(2, 3, 8, 8, seed=3).double()
    angle = 0.25
    c, s = math.cos(angle), math.sin(angle)
    centre = 3.5
    i, j = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    src_x = centre + c * (j - centre) - s * (i - centre)
    src_y = centre + s * (j - centre) + c * (i - centre)
    grid = torch.stack([src_x, src_y], -1).double() * 2 / 7 - 1  # align_corners=True: -1 and 1 are pixel centres
    expected = F.grid_sample(x, grid.expand(2, 8, 8, 2), mode="bilinear", padding_mode="zeros", align_corners=True)
    assert torch.allclose(rotate(x, angle, "bilinear"), expected, atol=1e-12)


def test_rotation_refuses_bad_arguments():
    with pytest.raises(ConfigurationError, match="finite number"):
        rotate(torch.zeros(1, 1, 3, 3), float("nan"))
    with pytest.raises(ConfigurationError, match="'nearest' or 'bilinear'"):
        rotate(torch.zeros(1, 1, 3, 3), 0.1, "bicubic")


# zoom


def test_zoom_by_one_is_identity():
    x = images(2, 3, 28, 28)
    assert torch.equal(zoom(x, 1.0), x)


@pytest.mark.parametrize(("side", "kept"), [(28, 26), (32, 30)])
def test_zoom_crops_tensorflow_central_crop_and_resizes_bilinearly(side, kept):
    # A ramp x[i, j] = j + 10 i stays linear under bilinear interpolation, so the output is known exactly:
    # tf.image.resize with half-pixel centres reads the crop at s = (j + 0.5) kept / side - 0.5, clamped.
    j = torch.arange(side, dtype=torch.float64)
    ramp = (j[None, :] + 10 * j[:, None]).expand(1, 2, side, side)
    s = ((j + 0.5) * kept / side - 0.5).clamp(0, kept - 1)
    expected = (1 + s)[None, :] + 10 * (1 + s)[:, None]  # the crop starts at row and column 1
    assert torch.allclose(zoom(ramp), expected.expand(1, 2, side, side), atol=1e-12)


def test_zoom_leaves_images_under_28_pixels_as_tensorflow_does():
    x = images(1, 1, 16, 16)
    assert torch.equal(zoom(x), x)
    assert not torch.equal(zoom(x, 0.8), x)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, True])
def test_zoom_refuses_fractions_outside_the_unit_interval(fraction):
    with pytest.raises(ConfigurationError, match=r"\(0, 1\]"):
        zoom(torch.zeros(1, 1, 28, 28), fraction)


# patch shuffle


def blocks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    h, w = x.shape[-2:]
    return [x[..., r : r + size, c : c + size] for r in range(0, h, size) for c in range(0, w, size)]


def test_patch_shuffle_is_a_permutation_of_blocks_shared_by_the_batch():
    x = images(3, 2, 8, 12)
    out = patch_shuffle(x, 4, seed=5)
    before, after = blocks(x, 4), blocks(out, 4)
    perm = [next(k for k, b in enumerate(before) if torch.equal(a, b)) for a in after]
    assert sorted(perm) == list(range(6)) and perm != list(range(6))
    assert torch.equal(patch_shuffle(x, 4, seed=5), out)  # seeded


def test_patch_shuffle_seeds_and_block_sizes():
    x = images(1, 1, 28, 28)
    assert not torch.equal(patch_shuffle(x, 7, seed=0), patch_shuffle(x, 7, seed=1))
    two = images(1, 1, 2, 4)
    assert torch.equal(patch_shuffle(two, 2), torch.cat([two[..., 2:], two[..., :2]], -1))  # only one non-identity
    pixels = patch_shuffle(x, 1, seed=3)  # blocks of one pixel: a permutation of the pixels
    assert torch.equal(pixels.flatten().sort().values, x.flatten().sort().values) and not torch.equal(pixels, x)


@pytest.mark.parametrize(("block", "match"), [(3, "must divide"), (28, "single block"), (0, "positive int")])
def test_patch_shuffle_refuses_bad_block_sizes(block, match):
    with pytest.raises(ConfigurationError, match=match):
        patch_shuffle(torch.zeros(1, 1, 28, 28), block)


# shared behaviour


ALL = [quadrant_swap, partial(shift, dx=1), partial(rotate, angle=0.3), zoom, partial(patch_shuffle, block_size=7)]


@pytest.mark.parametrize("transform", ALL, ids=transform_name)
def test_transforms_keep_shape_dtype_device_and_input(transform):
    for dtype in (torch.float32, torch.float64):
        x = images(2, 3, 28, 28).to(dtype)
        copy = x.clone()
        out = transform(x)
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert torch.equal(x, copy)


@pytest.mark.parametrize("transform", ALL, ids=transform_name)
@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(28, 28), r"\(n, C, H, W\).*unsqueeze"),
        (torch.zeros(0, 1, 28, 28), "non-empty"),
        (torch.zeros(1, 1, 28, 28, dtype=torch.uint8), "floating-point"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_transforms_refuse_non_image_input(transform, x, match):
    with pytest.raises(ConfigurationError, match=match):
        transform(x)


def test_paper_families_hold_the_papers_transforms():
    names = {name: [transform_name(t) for t in family] for name, family in PAPER_FAMILIES.items()}
    assert names == {
        "globalness": ["quadrant_swap"],
        "shift": ["shift(dx=1, dy=0)", "shift(dx=0, dy=1)"],
        "rotation": ["rotate(angle=0.25)", "rotate(angle=-0.25)"],
        "zoom": [f"zoom(crop_fraction={13 / 14!r})"],
    }
    with pytest.raises(TypeError):
        PAPER_FAMILIES["mine"] = (quadrant_swap,)  # read-only
