"""Image transforms of the after-kernel paper and kernel-space invariance scores (pure torch)."""

from lightning_afterkernel.invariance.scores import invariance_score, invariance_scores, kernel_cosines
from lightning_afterkernel.invariance.transforms import (
    PAPER_FAMILIES,
    Transform,
    patch_shuffle,
    quadrant_swap,
    rotate,
    shift,
    transform_name,
    zoom,
)

__all__ = [
    "PAPER_FAMILIES",
    "Transform",
    "invariance_score",
    "invariance_scores",
    "kernel_cosines",
    "patch_shuffle",
    "quadrant_swap",
    "rotate",
    "shift",
    "transform_name",
    "zoom",
]
