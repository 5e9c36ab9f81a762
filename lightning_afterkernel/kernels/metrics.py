"""Kernel-matrix metrics, computed in float64: alignments (uncentred, centred, with the labels), effective
rank, distances between kernels, eigen-spectrum."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_afterkernel.errors import ConfigurationError, KernelError

SYMMETRY_TOLERANCE = 1e-5
"""Largest relative asymmetry ||K - K^T||_F / ||K||_F accepted by the spectral metrics (float32 rounding)."""

PSD_TOLERANCE = 1e-4
"""Most negative eigenvalue, relative to the largest, accepted as rounding of a positive semi-definite kernel."""

CENTRED_TOLERANCE = 1e-10
"""A centred kernel with ||HKH||_F <= this * ||K||_F counts as zero (K is constant up to rounding)."""


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


def centered_kernel_alignment(k1: Tensor, k2: Tensor) -> float:
    r"""Centred kernel alignment (CKA) :math:`A(H K_1 H, H K_2 H)`, :math:`H = I - \mathbf{1}\mathbf{1}^\top / n`
    (Cortes, Mohri & Rostamizadeh 2012; Kornblith et al. 2019).

    Invariant to scaling and to adding a constant to either kernel. For linear kernels :math:`K_i = X_i X_i^\top`
    it is linear CKA, :math:`\|\tilde X_2^\top \tilde X_1\|_F^2 / (\|\tilde X_1^\top \tilde X_1\|_F
    \|\tilde X_2^\top \tilde X_2\|_F)` with column-centred features :math:`\tilde X_i`. Both kernels must be
    finite n x n matrices whose centred versions are not zero (as a constant kernel's is).
    """
    a, b = _pair(k1, k2, square=True)
    return _cosine(_centred(a, "k1"), _centred(b, "k2"))


def kernel_target_alignment(kernel: Tensor, y: Tensor) -> float:
    r"""Kernel-target alignment :math:`A(K, yy^\top) = y^\top K y / (n \|K\|_F)` (Cristianini et al. 2001),
    with labels :math:`y \in \{-1, 1\}^n`; labels in {0, 1} are mapped to :math:`2y - 1`."""
    k = _square(kernel, "kernel")
    if not isinstance(y, Tensor) or y.ndim != 1:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ConfigurationError(f"y must be a 1-D tensor of labels in {{0, 1}} or {{-1, 1}}; got {shape}.")
    if len(y) != len(k):
        raise KernelError(f"kernel is {len(k)} x {len(k)} but y has {len(y)} labels; give one label per row.")
    y = y.detach().to(device=k.device, dtype=torch.float64)
    values = set(y.unique().tolist())
    if values <= {0.0, 1.0}:
        y = 2 * y - 1
    elif not values <= {-1.0, 1.0}:
        raise ConfigurationError(f"y must hold labels in {{0, 1}} or {{-1, 1}}; got the values {sorted(values)}.")
    norm = torch.linalg.matrix_norm(k)
    if norm == 0:
        raise KernelError("kernel-target alignment is undefined for a zero kernel; kernel is all zeros.")
    return float((y @ k @ y / (len(y) * norm)).clamp(-1.0, 1.0))


def eigenspectrum(kernel: Tensor) -> Tensor:
    r"""Eigenvalues of a symmetric kernel matrix, descending, float64 (``torch.linalg.eigvalsh`` of
    :math:`(K + K^\top)/2`). Rounding can leave eigenvalues slightly below zero; they are returned as they are."""
    k = _symmetric(kernel, "kernel")
    return torch.linalg.eigvalsh(k).flip(0)


def effective_rank(kernel: Tensor, method: Literal["trace", "entropy"] = "trace") -> float:
    r"""Effective rank of a positive semi-definite kernel, from its eigenvalues :math:`\lambda_1 \ge \dots \ge
    \lambda_n \ge 0` (negative rounding noise set to 0). ``kernel`` is the (n, n) matrix or, to decompose it
    only once for several uses, its eigenvalues from :func:`eigenspectrum` (1-D, descending).

    ``"trace"`` (the paper's): :math:`\sum_i \lambda_i / \lambda_1 = \mathrm{tr} K / \lambda_1`.
    ``"entropy"`` (Roy & Vetterli 2007): :math:`\exp(-\sum_i p_i \log p_i)`, :math:`p_i = \lambda_i /
    \sum_j \lambda_j`. Always 1 <= trace <= entropy <= rank K (as :math:`e^{H} \ge 1 / \max_i p_i`): n for a
    multiple of the identity, 1 for a rank-one kernel. Raises :class:`KernelError` for a zero kernel or one with an
    eigenvalue below ``-PSD_TOLERANCE`` times the largest (not positive semi-definite).
    """
    if method not in ("trace", "entropy"):
        raise ConfigurationError(f"method must be 'trace' or 'entropy'; got {method!r}.")
    if isinstance(kernel, Tensor) and kernel.ndim == 1:
        eigenvalues = kernel.detach().to(torch.float64)
        if len(eigenvalues) == 0 or not torch.isfinite(eigenvalues).all():
            raise KernelError("the eigenvalues must be a non-empty finite 1-D tensor (from eigenspectrum).")
    else:
        eigenvalues = eigenspectrum(kernel)
    largest = eigenvalues[0]
    if largest <= 0:
        raise KernelError("effective rank is undefined for a kernel without a positive eigenvalue (e.g. all zeros).")
    if eigenvalues[-1] < -PSD_TOLERANCE * largest:
        raise KernelError(
            f"kernel is not positive semi-definite: eigenvalue {float(eigenvalues[-1]):.3g} against a largest "
            f"{float(largest):.3g}; effective rank needs a PSD kernel (a Gram matrix)."
        )
    eigenvalues = eigenvalues.clamp(min=0)
    if method == "trace":
        return float(eigenvalues.sum() / largest)
    p = eigenvalues[eigenvalues > 0] / eigenvalues.sum()
    return math.exp(float(-(p * p.log()).sum()))


def kernel_distance(
    kernel: Tensor, reference: Tensor, method: Literal["alignment", "cka", "frobenius"] = "alignment"
) -> float:
    r"""Distance of ``kernel`` from ``reference`` (e.g. the after kernel from the initial kernel).

    - ``"alignment"``: :math:`1 - A(K, K_\mathrm{ref})`, with :func:`kernel_alignment`; in [0, 2], 0 for
      positive multiples, so it measures a change of shape, not of scale. Symmetric.
    - ``"cka"``: :math:`1 - \mathrm{CKA}(K, K_\mathrm{ref})`, with :func:`centered_kernel_alignment`; also blind
      to added constants. Needs square kernels. Symmetric.
    - ``"frobenius"``: :math:`\|K - K_\mathrm{ref}\|_F / \|K_\mathrm{ref}\|_F`, the relative change, scale
      included; not symmetric (relative to ``reference``).
    """
    if method == "alignment":
        return 1.0 - kernel_alignment(kernel, reference)
    if method == "cka":
        return 1.0 - centered_kernel_alignment(kernel, reference)
    if method == "frobenius":
        k, ref = _pair(kernel, reference, square=False, names=("kernel", "reference"))
        norm = torch.linalg.matrix_norm(ref)
        if norm == 0:
            raise KernelError("the relative Frobenius distance is undefined for a zero reference kernel.")
        return float(torch.linalg.matrix_norm(k - ref) / norm)
    raise ConfigurationError(f"method must be 'alignment', 'cka' or 'frobenius'; got {method!r}.")


def _pair(k1: Tensor, k2: Tensor, *, square: bool, names: tuple[str, str] = ("k1", "k2")) -> tuple[Tensor, Tensor]:
    check = _square if square else _matrix
    a = check(k1, names[0])
    b = check(k2, names[1]).to(a.device)
    if a.shape != b.shape:
        raise KernelError(
            f"{names[0]} and {names[1]} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    return a, b


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(((a * b).sum() / (torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b))).clamp(-1.0, 1.0))


def _centred(kernel: Tensor, name: str) -> Tensor:
    """HKH: K minus its row means and column means, plus its overall mean."""
    centred = kernel - kernel.mean(0, keepdim=True) - kernel.mean(1, keepdim=True) + kernel.mean()
    if torch.linalg.matrix_norm(centred) <= CENTRED_TOLERANCE * torch.linalg.matrix_norm(kernel):
        raise KernelError(
            f"{name} is constant (or zero), so its centred version is zero and CKA is undefined; use "
            "kernel_alignment (uncentred) for such kernels."
        )
    return centred


def _square(kernel: Tensor, name: str) -> Tensor:
    k = _matrix(kernel, name)
    if k.shape[0] != k.shape[1] or k.shape[0] == 0:
        raise KernelError(f"{name} must be a square n x n kernel matrix (n >= 1); got shape {tuple(k.shape)}.")
    return k


def _symmetric(kernel: Tensor, name: str) -> Tensor:
    k = _square(kernel, name)
    if torch.linalg.matrix_norm(k - k.mT) > SYMMETRY_TOLERANCE * torch.linalg.matrix_norm(k):
        raise KernelError(
            f"{name} is not symmetric (relative asymmetry above {SYMMETRY_TOLERANCE}); spectral metrics need a Gram "
            "matrix K(x_i, x_j) of one set of inputs, not a cross kernel."
        )
    return (k + k.mT) / 2


def _matrix(kernel: Tensor, name: str) -> Tensor:
    if not isinstance(kernel, Tensor):
        raise KernelError(f"{name} must be a torch.Tensor (a kernel matrix); got {type(kernel).__name__}.")
    if kernel.ndim != 2:
        raise KernelError(f"{name} must be a 2-D kernel matrix; got shape {tuple(kernel.shape)}.")
    kernel = kernel.detach().to(torch.float64)
    if not torch.isfinite(kernel).all():
        raise KernelError(f"{name} has non-finite entries (nan or inf); recompute it or check the model.")
    return kernel
