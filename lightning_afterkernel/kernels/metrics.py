"""Similarity measures between kernel matrices."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_afterkernel.errors import KernelError


def kernel_alignment(k1: Tensor, k2: Tensor) -> float:
    r"""Uncentred kernel alignment :math:`A(K_1, K_2) = \langle K_1, K_2\rangle_F / (\|K_1\|_F \|K_2\|_F)`.

    The cosine between the two matrices, in [-1, 1] (1 for PSD kernels that are positive multiples of each
    other), computed in float64. Both must be finite matrices of the same shape and neither may be zero.
    """
    a = _matrix(k1, "k1")
    b = _matrix(k2, "k2").to(a.device)
    if a.shape != b.shape:
        raise KernelError(f"k1 and k2 must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}.")
    norms = torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b)
    if norms == 0:
        raise KernelError("kernel alignment is undefined for a zero kernel; k1 or k2 is all zeros.")
    return float(((a * b).sum() / norms).clamp(-1.0, 1.0))


def _matrix(kernel: Tensor, name: str) -> Tensor:
    if not isinstance(kernel, Tensor):
        raise KernelError(f"{name} must be a torch.Tensor (a kernel matrix); got {type(kernel).__name__}.")
    if kernel.ndim != 2:
        raise KernelError(f"{name} must be a 2-D kernel matrix; got shape {tuple(kernel.shape)}.")
    kernel = kernel.detach().to(torch.float64)
    if not torch.isfinite(kernel).all():
        raise KernelError(f"{name} has non-finite entries (nan or inf); recompute it or check the model.")
    return kernel
