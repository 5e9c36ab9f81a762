r"""Invariance of a network's kernel to image transforms: the mean cosine similarity in kernel space

.. math:: s_T = \frac{1}{n} \sum_i \frac{K(x_i, T x_i)}{\sqrt{K(x_i, x_i)\, K(T x_i, T x_i)}},

for the empirical NTK (``kernel="ntk"``) or the conjugate kernel (``kernel="ck"``). Only the needed kernel
entries are computed: per image, the small Gram matrix of the image and its transforms
(:func:`~lightning_afterkernel.kernels.empirical_ntk_views`); no n x n matrix is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_afterkernel.errors import ConfigurationError, KernelError
from lightning_afterkernel.invariance.transforms import PAPER_FAMILIES, Transform, check_images, transform_name
from lightning_afterkernel.kernels import conjugate_kernel_views, empirical_ntk_views

KernelName = Literal["ntk", "ck"]
TransformSpec = str | Transform | Sequence[Transform]
"""A family name of :data:`PAPER_FAMILIES`, one transform, or a family (sequence) of transforms."""

_KERNELS = {"ntk": empirical_ntk_views, "ck": conjugate_kernel_views}


def kernel_cosines(
    model: nn.Module, x: Tensor, transforms: Sequence[Transform], kernel: KernelName = "ntk", **kernel_options: Any
) -> Tensor:
    r"""Per-example cosine similarities :math:`s[t, i] = K(x_i, T_t x_i) / \sqrt{K(x_i, x_i) K(T_t x_i, T_t x_i)}`.

    One call of :func:`~lightning_afterkernel.kernels.empirical_ntk_views` (or
    :func:`~lightning_afterkernel.kernels.conjugate_kernel_views`) on the views :math:`[x, T_1 x, \dots, T_k x]`:
    (k + 1) n per-example gradients (NTK) or feature maps (CK), 7 n for the paper's six transforms, and no
    n x n product; memory O(k n) images and (k + 1)^2 n kernel values.

    Args:
        model: a network with one logit or k logits per example (``"ntk"``; with k logits the kernel of the
            ``outputs`` kernel option, the trace by default) or one with a ``features`` method (``"ck"``).
        x: images (n, C, H, W).
        transforms: maps of (n, C, H, W) batches to batches of the same shape.
        kernel: ``"ntk"`` (:func:`~lightning_afterkernel.kernels.empirical_ntk`) or ``"ck"``
            (:func:`~lightning_afterkernel.kernels.conjugate_kernel`).
        **kernel_options: passed on to the kernel (``batch_size``, ``dtype``, ``device``).

    Returns:
        (k, n) float64 tensor on the kernel's device.
    """
    check_images(x)
    if kernel not in _KERNELS:
        raise ConfigurationError(f"kernel must be 'ntk' (empirical NTK) or 'ck' (conjugate kernel); got {kernel!r}.")
    transforms = tuple(transforms)
    if not transforms:
        raise ConfigurationError("transforms is empty; give at least one transform.")
    views = [x] + [_apply(t, x) for t in transforms]
    gram = _KERNELS[kernel](model, views, **kernel_options).to(torch.float64)  # (n, k + 1, k + 1)
    if not torch.isfinite(gram).all():
        raise KernelError(f"the {kernel} kernel has non-finite entries (nan or inf) on x; check the model and x.")
    diagonal = gram.diagonal(dim1=1, dim2=2).T  # (k + 1, n)
    _check_positive(diagonal[0], kernel, "K(x_i, x_i)", "x")
    for t, transform in enumerate(transforms):
        _check_positive(diagonal[t + 1], kernel, "K(T x_i, T x_i)", transform_name(transform))
    return gram[:, 0, 1:].T / (diagonal[:1] * diagonal[1:]).sqrt()


def invariance_score(
    model: nn.Module, x: Tensor, transform: TransformSpec, kernel: KernelName = "ntk", **kernel_options: Any
) -> float:
    """Mean over the images and over the family's transforms of :func:`kernel_cosines`: 1 for a kernel that
    cannot tell x from T x, lower the more the transform changes x in kernel space.

    ``transform`` is a name of :data:`PAPER_FAMILIES` (``"globalness"``, ``"shift"``, ``"rotation"``,
    ``"zoom"``), one transform (e.g. ``functools.partial(rotate, angle=0.1)``) or a sequence of them.
    """
    return float(kernel_cosines(model, x, _family(transform), kernel, **kernel_options).mean())


def invariance_scores(
    model: nn.Module,
    x: Tensor,
    families: Mapping[str, TransformSpec] | Iterable[str] = PAPER_FAMILIES,
    kernel: KernelName = "ntk",
    **kernel_options: Any,
) -> dict[str, float]:
    """:func:`invariance_score` for several families at once, sharing one :func:`kernel_cosines` call (so the
    diagonal of x is computed once): ``{name: score}``. The default gives the paper's four scores; ``families``
    may also list names of :data:`PAPER_FAMILIES` or map new names to transforms."""
    if isinstance(families, str):
        raise ConfigurationError(f"families must be a mapping or a list of names, not the string {families!r}.")
    named = dict(families) if isinstance(families, Mapping) else {name: name for name in families}
    if not named:
        raise ConfigurationError("families is empty; name at least one, e.g. families=['shift'].")
    groups = {name: _family(spec) for name, spec in named.items()}
    cosines = kernel_cosines(model, x, [t for group in groups.values() for t in group], kernel, **kernel_options)
    scores, start = {}, 0
    for name, group in groups.items():
        scores[name] = float(cosines[start : start + len(group)].mean())
        start += len(group)
    return scores


def _family(spec: TransformSpec) -> tuple[Transform, ...]:
    if isinstance(spec, str):
        if spec not in PAPER_FAMILIES:
            raise ConfigurationError(
                f"unknown transform family {spec!r}; use one of {', '.join(map(repr, PAPER_FAMILIES))}, a "
                "transform (a callable on image batches) or a sequence of transforms."
            )
        return PAPER_FAMILIES[spec]
    family = (spec,) if callable(spec) else tuple(spec)
    if not family or not all(callable(t) for t in family):
        raise ConfigurationError(f"a transform family must be a non-empty sequence of callables; got {spec!r}.")
    return family


def _apply(transform: Transform, x: Tensor) -> Tensor:
    out = transform(x)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigurationError(
            f"transform {transform_name(transform)} must return a batch of x's shape {tuple(x.shape)}; got {shape}."
        )
    return out


def _check_positive(diagonal: Tensor, kernel: str, what: str, source: str) -> None:
    bad = (diagonal <= 0).nonzero().flatten()
    if len(bad):
        raise KernelError(
            f"{what} <= 0 for {len(bad)} of {len(diagonal)} images (first: i = {int(bad[0])}) of the {kernel} "
            f"kernel on {source}, so the cosine similarity is undefined. A zero self-similarity means a zero "
            "gradient or zero features (e.g. a blank image through ReLU layers with zero biases); drop such images."
        )
