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
    example_logits,
    mirror_upper,
    prepare,
    resolve_outputs,
    scalar_logit,
)


def reference_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    outputs: str | int = "trace",
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Exact empirical NTK :math:`K(x, x') = \sum_\ell \langle \partial f(x)/\partial\theta_\ell,
    \partial f(x')/\partial\theta_\ell \rangle` over the parameters with ``requires_grad=True``.

    The PyTorch NTK tutorial's "Jacobian contraction": ``vmap(jacrev(f))`` gives every example's gradient,
    then one contraction per parameter tensor. The model runs in eval mode on copies of its tensors cast to
    ``dtype`` (float64 by default), so the model, its parameters and their ``.grad`` are left untouched.

    Args:
        model: module whose forward maps a batch (n, ...) to one logit per example, (n,) or (n, 1), or to k
            logits, (n, k).
        x1: inputs (n1, ...).
        x2: inputs (n2, ...) with x1's per-example shape; ``None`` gives the symmetric Gram matrix of ``x1``.
        outputs: for k logits, ``"trace"`` (:math:`\sum_c \langle \nabla f_c(x), \nabla f_c(x')\rangle`),
            ``"full"`` (the (n1, n2, k, k) blocks :math:`\langle \nabla f_a(x), \nabla f_b(x')\rangle`) or an int
            c (the NTK of logit c). With one logit every mode is that logit's kernel ("full": (n1, n2, 1, 1)).
        dtype: floating dtype of the computation and of the result.
        chunk_size: examples per vectorised Jacobian call (``vmap``'s ``chunk_size``); ``None``: all at once.

    Returns:
        The (n1, n2) kernel ((n1, n2, k, k) for ``"full"``) in ``dtype`` on the model's device; exactly symmetric
        when ``x2`` is None.

    Cost: holds the full Jacobians, (n1 + n2) s P floats for P parameters and s logits; n1 n2 s P multiply-adds
    (s^2 for ``"full"``).
    """
    check_model(model, needs_trainable=True)
    check_options(dtype, chunk_size=chunk_size)
    with eval_mode(model), autograd_enabled():
        x1, x2, trainable, fixed = prepare(model, x1, x2, dtype=dtype, device=None)
        spec = resolve_outputs(outputs, model, trainable, fixed, x1)
        n1, n2 = len(x1), len(x1 if x2 is None else x2)
        if spec.logits is None:
            per_example = jacrev(lambda p, x: scalar_logit(model, p, fixed, x))
            jacobian = vmap(per_example, in_dims=(None, 0), chunk_size=chunk_size)
            j1 = jacobian(trainable, x1)
            j2 = j1 if x2 is None else jacobian(trainable, x2)
            kernel = sum(j1[name].reshape(n1, -1) @ j2[name].reshape(n2, -1).mT for name in trainable)
            kernel = mirror_upper(kernel) if x2 is None else kernel
            return kernel[..., None, None] if spec.full else kernel
        selected = list(spec.logits)
        per_example = jacrev(lambda p, x: example_logits(model, p, fixed, x)[selected])
        jacobian = vmap(per_example, in_dims=(None, 0), chunk_size=chunk_size)
        s = len(selected)

        def rows(x: Tensor, n: int) -> Tensor:  # (n, s, P): every example's gradient of every selected logit
            return torch.cat([j.reshape(n, s, -1) for j in jacobian(trainable, x).values()], dim=2)

        r1 = rows(x1, n1)
        r2 = r1 if x2 is None else rows(x2, n2)
        if spec.stacked:
            kernel = (r1.reshape(n1 * s, -1) @ r2.reshape(n2 * s, -1).mT).view(n1, s, n2, s).permute(0, 2, 1, 3)
        else:
            kernel = r1.reshape(n1, -1) @ r2.reshape(n2, -1).mT
        return mirror_upper(kernel) if x2 is None else kernel
