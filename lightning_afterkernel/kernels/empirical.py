"""Empirical NTK of a scalar-output model: the production entry point."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from lightning_afterkernel.kernels._model import (
    autograd_enabled,
    check_model,
    check_options,
    eval_mode,
    mirror_upper,
    prepare,
    scalar_logit,
)

CHUNK_BYTES = 256 * 2**20
"""Target size of one chunk's Jacobian when ``batch_size`` is None."""


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Empirical NTK :math:`K(x, x') = \langle \partial f(x)/\partial\theta, \partial f(x')/\partial\theta
    \rangle`, with :math:`\theta` the parameters with ``requires_grad=True``.

    The examples are split into near-equal chunks of at most ``batch_size``. A chunk's Jacobian :math:`J_c`
    (one flattened per-example gradient per row, from ``vmap(grad(f))``) is recomputed whenever a tile
    :math:`K_{ab} = J_a J_b^\top` needs it, so at most two chunk Jacobians are alive at once. When ``x2`` is
    None only the tiles on and above the diagonal are computed and the others are their transposes.
    The model runs in eval mode on copies of its tensors; the model, its train/eval flags, its parameters
    and their ``.grad`` are left as they were. Works under ``torch.no_grad()`` and ``torch.inference_mode()``.

    Cost, for P parameters and m = ceil(n / batch_size) chunks of b = n / m examples:
        time: n1 n2 P multiply-adds (about half when symmetric) plus per-example gradients (one forward and
        backward each): n (m + 1) / 2 of them when symmetric, n1 + m1 n2 otherwise;
        memory: the n1 x n2 result plus two chunk Jacobians (2 b P floats) plus one chunk's activations.

    Args:
        model: module whose forward maps a batch (n, ...) to one logit per example, (n,) or (n, 1).
        x1: inputs (n1, ...).
        x2: inputs (n2, ...) with x1's per-example shape; ``None`` gives the symmetric Gram matrix of ``x1``.
        batch_size: examples per chunk; ``None`` makes a chunk's Jacobian about 256 MB.
        dtype: floating dtype of the computation and of the result.
        device: where to compute (the model and inputs are copied there); ``None`` uses the model's device.

    Returns:
        The (n1, n2) kernel in ``dtype`` on the computation device; exactly symmetric when ``x2`` is None.
    """
    check_model(model, needs_trainable=True)
    check_options(dtype, batch_size=batch_size)
    with eval_mode(model), autograd_enabled():
        x1, x2, trainable, fixed = prepare(model, x1, x2, dtype=dtype, device=device)
        if batch_size is None:
            n_params = sum(p.numel() for p in trainable.values())
            batch_size = max(1, CHUNK_BYTES // (n_params * dtype.itemsize))
        per_example = vmap(grad(lambda p, x: scalar_logit(model, p, fixed, x)), in_dims=(None, 0))

        def jacobian(x: Tensor) -> list[Tensor]:
            return [g.flatten(1) for g in per_example(trainable, x).values()]

        rows = _chunks(len(x1), batch_size)
        if x2 is None:
            kernel = torch.empty(len(x1), len(x1), dtype=dtype, device=x1.device)
            for a, r in enumerate(rows):
                j_r = jacobian(x1[r])
                kernel[r, r] = mirror_upper(_gram(j_r, j_r))
                for c in rows[a + 1 :]:
                    j_c = jacobian(x1[c])
                    kernel[r, c] = _gram(j_r, j_c)
                    kernel[c, r] = kernel[r, c].mT
                    del j_c
                del j_r
            return kernel
        kernel = torch.empty(len(x1), len(x2), dtype=dtype, device=x1.device)
        columns = _chunks(len(x2), batch_size)
        for r in rows:
            j_r = jacobian(x1[r])
            for c in columns:
                j_c = jacobian(x2[c])
                kernel[r, c] = _gram(j_r, j_c)
                del j_c
            del j_r
        return kernel


def _chunks(n: int, size: int) -> list[slice]:
    """The fewest chunks of at most ``size`` examples, of near-equal sizes (no small last chunk)."""
    count = -(-n // size)
    bounds = [n * i // count for i in range(count + 1)]
    return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]


def _gram(j1: list[Tensor], j2: list[Tensor]) -> Tensor:
    """sum over parameter tensors of J1_l J2_l^T."""
    out = j1[0] @ j2[0].mT
    for a, b in zip(j1[1:], j2[1:], strict=True):
        out.addmm_(a, b.mT)
    return out
