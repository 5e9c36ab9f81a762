"""Exact empirical NTK by Jacobian contraction with ``torch.func`` (slow; for tests and benchmarks)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from lightning_afterkernel.kernels._model import (
    autograd_enabled,
    check_model,
    check_options,
    eval_mode,
    mirror_upper,
    prepare,
    scalar_logit,
)


def reference_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Exact empirical NTK :math:`K(x, x') = \sum_\ell \langle \partial f(x)/\partial\theta_\ell,
    \partial f(x')/\partial\theta_\ell \rangle` over the parameters with ``requires_grad=True``.

    The PyTorch NTK tutorial's "Jacobian contraction": ``vmap(jacrev(f))`` gives every example's gradient,
    then one contraction per parameter tensor. The model runs in eval mode on copies of its tensors cast to
    ``dtype`` (float64 by default), so the model, its parameters and their ``.grad`` are left untouched.

    Args:
        model: module whose forward maps a batch (n, ...) to one logit per example, (n,) or (n, 1).
        x1: inputs (n1, ...).
        x2: inputs (n2, ...) with x1's per-example shape; ``None`` gives the symmetric Gram matrix of ``x1``.
        dtype: floating dtype of the computation and of the result.
        chunk_size: examples per vectorised Jacobian call (``vmap``'s ``chunk_size``); ``None``: all at once.

    Returns:
        The (n1, n2) kernel in ``dtype`` on the model's device; exactly symmetric when ``x2`` is None.

    Cost: holds the full Jacobians, (n1 + n2) P floats for P parameters; n1 n2 P multiply-adds.
    """
    check_model(model, needs_trainable=True)
    check_options(dtype, chunk_size=chunk_size)
    with eval_mode(model), autograd_enabled():
        x1, x2, trainable, fixed = prepare(model, x1, x2, dtype=dtype, device=None)
        per_example = jacrev(lambda p, x: scalar_logit(model, p, fixed, x))
        jacobian = vmap(per_example, in_dims=(None, 0), chunk_size=chunk_size)
        j1 = jacobian(trainable, x1)
        j2 = j1 if x2 is None else jacobian(trainable, x2)
        n1, n2 = len(x1), len(x1 if x2 is None else x2)
        kernel = sum(j1[name].reshape(n1, -1) @ j2[name].reshape(n2, -1).mT for name in trainable)
        return mirror_upper(kernel) if x2 is None else kernel
