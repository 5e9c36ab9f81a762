"""Kernel-matrix metrics, computed in float64: alignments (uncentred, centred, with the labels), effective
rank, distances between kernels, eigen-spectrum.

Cost for an n x n kernel: the alignments, CKA, the distances and the kernel-target alignment read the kernels a
few times (whole-matrix BLAS products, no n x n temporary beyond the float64 copy of a float32 input, which is
exact); the trace effective rank and the top of the spectrum come from block Lanczos, about 10 to 16 products
K V with a block V of 8 to 32 columns, each about one read of K; only the whole spectrum (``eigenspectrum(K)``,
the entropy effective rank of a kernel) needs ``eigvalsh``, O(n^3): about 40 s at n = 12,000 on a 2-core CPU.
Everything runs on the kernel's device (CPU or CUDA).
"""

from __future__ import annotations

import math
import warnings
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

SPECTRUM_TOLERANCE = 1e-6
"""Eigenvalues computed by block Lanczos (``eigenspectrum(K, top=k)``, the largest eigenvalue of
``effective_rank(K, "trace")``) are certified to this fraction of the largest eigenvalue: each Ritz value's
residual ||K y - theta y|| is at most this times the largest Ritz value, so an eigenvalue lies that close."""

DENSE_MAX_N = 512
"""Up to this n, the top eigenvalues and the trace effective rank come from the full ``eigvalsh`` (exact, with
the exact PSD check, and cheaper than block Lanczos at this size)."""

ENTROPY_RANK_MAX_N = 4096
"""The largest n (kernel size, or the smaller side of a feature matrix) at which the entropy effective rank is
affordable in an evaluation: it needs the whole spectrum, ``eigvalsh`` of an n x n matrix, O(n^3) (about 2 s
at 4,096 on a 2-core CPU, 40 s at 12,000)."""

PSD_GUARANTEE = 0.1
"""Block Lanczos' PSD check (above :data:`DENSE_MAX_N`) runs enough steps that a kernel with an eigenvalue below
-PSD_GUARANTEE times the largest is refused with probability at least 1 - :data:`PSD_MISS`, whatever the rest
of its spectrum; smaller negative eigenvalues (down to -PSD_TOLERANCE times the largest) are refused whenever
the Krylov space reaches them, which an isolated negative eigenvalue does in practice."""

PSD_MISS = 1e-6
"""The probability bound of :data:`PSD_GUARANTEE` (over the random start of block Lanczos, which is seeded)."""

_LANCZOS_SEED = 0
_LANCZOS_MAX_DIM = 3000
"""Largest Krylov space ever tried (two n x 3000 float64 buffers: 580 MB at n = 12,000); block Lanczos also stops at
n / 3 and at 4 times the expected size, then falls back to the full ``eigvalsh`` with a warning."""
_ROWS = 256
"""Rows per block of the blocked passes over kernels (a 256 x n float64 temporary: 25 MB at n = 12,000); the
contiguous kernels of an evaluation go through whole-matrix BLAS dot and matrix-vector products instead."""
_CANCELLATION = 1e-6
"""CKA and the Frobenius distance come from inner products of the kernels while the subtraction loses at most 6 of
float64's 16 digits (||HKH||_F^2 >= this * ||K||_F^2; ||K - R||_F^2 >= this * (||K||_F^2 + ||R||_F^2)); below, the
centred kernel or the difference is formed explicitly, a block of rows at a time."""
_TILE = 128
"""Side of the tiles of the symmetry check."""
_TRACE_BLOCK = 8
"""Block size of the trace effective rank's Lanczos (13 steps at n = 12,000, set by the PSD guarantee)."""
_TOP_BLOCK = 32
"""Largest block size of ``eigenspectrum(top=k)`` (k / 2, between 8 and 32): below ~32 columns a product K V
costs about one read of K, so wider blocks take fewer steps for about the same time."""


def kernel_alignment(k1: Tensor, k2: Tensor) -> float:
    r"""Uncentred kernel alignment :math:`A(K_1, K_2) = \langle K_1, K_2\rangle_F / (\|K_1\|_F \|K_2\|_F)`.

    The cosine between the two matrices, in [-1, 1] (1 for PSD kernels that are positive multiples of each
    other), computed in float64. Both must be finite matrices of the same shape and neither may be zero.
    """
    a, b = _pair(k1, k2, square=False)
    ab, aa, bb = _products(a, b)
    if aa == 0 or bb == 0:
        raise KernelError("kernel alignment is undefined for a zero kernel; k1 or k2 is all zeros.")
    return float((ab / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0))


def centered_kernel_alignment(k1: Tensor, k2: Tensor) -> float:
    r"""Centred kernel alignment (CKA) :math:`A(H K_1 H, H K_2 H)`, :math:`H = I - \mathbf{1}\mathbf{1}^\top / n`
    (Cortes, Mohri & Rostamizadeh 2012; Kornblith et al. 2019).

    Invariant to scaling and to adding a constant to either kernel. For linear kernels :math:`K_i = X_i X_i^\top`
    it is linear CKA, :math:`\|\tilde X_2^\top \tilde X_1\|_F^2 / (\|\tilde X_1^\top \tilde X_1\|_F
    \|\tilde X_2^\top \tilde X_2\|_F)` with column-centred features :math:`\tilde X_i`. Both kernels must be
    finite n x n matrices whose centred versions are not zero (as a constant kernel's is). Computed from inner
    products and row and column sums of the kernels, without forming HKH unless a kernel is within 1e-3 of a
    constant (:func:`_centred_products`).
    """
    a, b = _pair(k1, k2, square=True)
    ab, aa, bb, norms = _centred_products(a, b)
    for name, squared, norm in (("k1", aa, norms[0]), ("k2", bb, norms[1])):
        if squared.clamp(min=0).sqrt() <= CENTRED_TOLERANCE * norm:
            raise KernelError(
                f"{name} is constant (or zero), so its centred version is zero and CKA is undefined; use "
                "kernel_alignment (uncentred) for such kernels."
            )
    return float((ab / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0))


def kernel_target_alignment(kernel: Tensor, y: Tensor, num_classes: int | None = None) -> float:
    r"""Kernel-target alignment :math:`A(K, T) = \langle K, T\rangle_F / (\|K\|_F \|T\|_F)` of the kernel with the
    labels' target kernel T (Cristianini et al. 2001).

    - ``num_classes=None`` (two classes): :math:`T = yy^\top`, :math:`A = y^\top K y / (n \|K\|_F)`, with labels
      :math:`y \in \{-1, 1\}^n`; labels in {0, 1} are mapped to :math:`2y - 1`.
    - ``num_classes=k`` (k >= 2; integer labels 0..k-1): centred one-hot targets, :math:`T = Y_c Y_c^\top` with
      :math:`Y_c = \mathrm{onehot}(y) - 1/k` (n x k), :math:`A = \mathrm{tr}(Y_c^\top K Y_c) / (\|K\|_F
      \|Y_c^\top Y_c\|_F)` (:func:`_class_target_alignment`). For k = 2, :math:`Y_c Y_c^\top = yy^\top / 2` with
      :math:`y = 2 \cdot \mathrm{label} - 1`: the two-class value.
    """
    k = _square(kernel, "kernel")
    if not isinstance(y, Tensor) or y.ndim != 1:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ConfigurationError(f"y must be a 1-D tensor of labels in {{0, 1}} or {{-1, 1}}; got {shape}.")
    if len(y) != len(k):
        raise KernelError(f"kernel is {len(k)} x {len(k)} but y has {len(y)} labels; give one label per row.")
    norm = torch.linalg.matrix_norm(k)
    if num_classes is not None:
        return _class_target_alignment(k, y, num_classes, norm)
    y = y.detach().to(device=k.device, dtype=torch.float64)
    values = set(y.unique().tolist())
    if values <= {0.0, 1.0}:
        y = 2 * y - 1
    elif not values <= {-1.0, 1.0}:
        raise ConfigurationError(
            f"y must hold labels in {{0, 1}} or {{-1, 1}}; got the values {sorted(values)} (for k classes "
            "labelled 0..k-1, pass num_classes=k)."
        )
    if norm == 0:
        raise KernelError("kernel-target alignment is undefined for a zero kernel; kernel is all zeros.")
    return float((y @ k @ y / (len(y) * norm)).clamp(-1.0, 1.0))


def _class_target_alignment(k: Tensor, y: Tensor, num_classes: int, norm: Tensor) -> float:
    """:func:`kernel_target_alignment` with centred one-hot targets of ``num_classes`` classes (``norm``: ||K||_F)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigurationError(f"num_classes={num_classes!r} must be an integer >= 2, or None for two classes.")
    labels = y.detach().to(k.device)
    whole = labels.dtype != torch.bool and (not labels.is_floating_point() or bool((labels == labels.round()).all()))
    if not whole or not bool(((labels >= 0) & (labels < num_classes)).all()):
        found = sorted(set(labels.tolist()))[:12]
        raise ConfigurationError(
            f"with num_classes={num_classes}, y must hold integer labels 0..{num_classes - 1}; got the values {found}."
        )
    if norm == 0:
        raise KernelError("kernel-target alignment is undefined for a zero kernel; kernel is all zeros.")
    targets = torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64) - 1.0 / num_classes
    target_norm = torch.linalg.matrix_norm(targets.mT @ targets)  # ||Y Y^T||_F = ||Y^T Y||_F
    return float(((targets * (k @ targets)).sum() / (norm * target_norm)).clamp(-1.0, 1.0))


def eigenspectrum(kernel: Tensor, top: int | None = None) -> Tensor:
    r"""Eigenvalues of a symmetric kernel matrix (of :math:`(K + K^\top)/2`), descending, float64.

    - ``top=None``: all n, from ``torch.linalg.eigvalsh``: O(n^3), about 40 s at n = 12,000 on a 2-core CPU.
    - ``top=k``: the k largest (all n when k >= n), each within :data:`SPECTRUM_TOLERANCE` times the largest
      of the true eigenvalue: block Lanczos (blocks of k / 2 columns, 8 to 32; full reorthogonalisation; a seeded
      random start, so the result is reproducible) until every Ritz value's residual certifies it. Each step
      is one product K V, about one read of K: the top 64 of the paper MLP's NTK at n = 11,982 took 10 steps.
      From ``eigvalsh`` up to :data:`DENSE_MAX_N` or where k is over ~n / 16, and (with a warning) where
      Lanczos does not certify them within n / 3 vectors.

    Works on the kernel's device (CPU or CUDA), in float64 whatever the input's floating dtype. Rounding can leave
    eigenvalues slightly below zero; they are returned as they are.
    """
    k = _symmetric(kernel, "kernel")
    if top is None:
        return torch.linalg.eigvalsh(k).flip(0)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigurationError(
            f"top must be a positive integer (how many of the largest eigenvalues) or None; got {top!r}."
        )
    block = max(_TRACE_BLOCK, min(_TOP_BLOCK, top // 2))
    return _extreme_eigenvalues(k, min(top, len(k)), block=block, min_steps=1)[0]


def gram_eigenspectrum(features: Tensor) -> Tensor:
    r"""Eigenvalues of the Gram matrix :math:`K = \Phi \Phi^\top` of features :math:`\Phi` (n, d), descending,
    float64, from the smaller of :math:`\Phi^\top \Phi` (d x d) and :math:`\Phi \Phi^\top`: the min(n, d)
    eigenvalues that can be non-zero (the other n - d are exactly 0). The whole spectrum, so
    :func:`effective_rank` takes it for both methods; for the conjugate kernel (d << n) it costs n d^2 + O(d^3)
    instead of ``eigenspectrum(K)``'s O(n^3), and carries no float32 rounding of K (its noise eigenvalues).
    """
    phi = _matrix(features, "features")
    if phi.shape[0] == 0 or phi.shape[1] == 0:
        raise KernelError(f"features must be a non-empty (n, d) matrix; got shape {tuple(phi.shape)}.")
    gram = phi.mT @ phi if phi.shape[1] < phi.shape[0] else phi @ phi.mT
    return torch.linalg.eigvalsh(gram).flip(0)


def effective_rank(kernel: Tensor, method: Literal["trace", "entropy"] = "trace") -> float:
    r"""Effective rank of a positive semi-definite kernel, from its eigenvalues :math:`\lambda_1 \ge \dots \ge
    \lambda_n`. ``kernel`` is the (n, n) matrix or its whole spectrum (1-D, descending: from
    :func:`eigenspectrum` without ``top``, or :func:`gram_eigenspectrum`), to decompose a kernel only once.

    - ``"trace"`` (the paper's): :math:`\mathrm{tr} K / \lambda_1 = \sum_i \lambda_i / \lambda_1`. From a matrix
      it needs only :math:`\lambda_1`: block Lanczos (blocks of 8) to :data:`SPECTRUM_TOLERANCE`, tr K exact;
      13 products K V at n = 11,982, a number set by the PSD check below (``eigvalsh`` up to
      :data:`DENSE_MAX_N`). From a spectrum it is the sum of the eigenvalues (negative rounding included, so
      that it is tr K as from the matrix) over the largest.
    - ``"entropy"`` (Roy & Vetterli 2007): :math:`\exp(-\sum_i p_i \log p_i)`, :math:`p_i = \max(\lambda_i, 0) /
      \sum_j \max(\lambda_j, 0)`. It needs every eigenvalue, and no cheaper exact route exists for a general
      kernel (the NTK of a network with more parameters than examples has full rank): from a matrix it takes
      ``eigvalsh``, O(n^3). An evaluation should compute it only where that is affordable, n <=
      :data:`ENTROPY_RANK_MAX_N`, or from the features of a kernel :math:`\Phi\Phi^\top` with few of them
      (:func:`gram_eigenspectrum`; the conjugate kernel), and leave it out otherwise.

    Always 1 <= trace <= entropy <= rank K (as :math:`e^{H} \ge 1 / \max_i p_i`): n for a multiple of the
    identity, 1 for a rank-one kernel. Raises :class:`KernelError` for a kernel without a positive eigenvalue
    (e.g. zero) or one that is not positive semi-definite: an eigenvalue below ``-PSD_TOLERANCE`` times the
    largest. With the whole spectrum the PSD check is exact. Block Lanczos sees only part of it: it refuses the
    kernel when a diagonal entry or the smallest Ritz value (an upper bound on the smallest eigenvalue) is below
    that, and runs enough steps that an eigenvalue below ``-PSD_GUARANTEE`` times the largest is found with
    probability at least ``1 - PSD_MISS`` (:data:`PSD_GUARANTEE`); a slightly negative one (float32 noise) may
    pass, as it would be clipped to 0 by the entropy.
    """
    if method not in ("trace", "entropy"):
        raise ConfigurationError(f"method must be 'trace' or 'entropy'; got {method!r}.")
    if isinstance(kernel, Tensor) and kernel.ndim == 1:
        eigenvalues = kernel.detach().to(torch.float64)
        if len(eigenvalues) == 0 or not torch.isfinite(eigenvalues).all():
            raise KernelError("the eigenvalues must be a non-empty finite 1-D tensor (from eigenspectrum).")
        return _rank_from_spectrum(eigenvalues, method)
    k = _symmetric(kernel, "kernel")
    if method == "entropy":
        return _rank_from_spectrum(torch.linalg.eigvalsh(k).flip(0), method)
    return _trace_rank(k)


def _trace_rank(k: Tensor) -> float:
    """tr K / lambda_1 with lambda_1 from block Lanczos, and the PSD check that affords (see effective_rank)."""
    diagonal = k.diagonal()
    # lambda_1 <= ||K||_F, so a Ritz value (or a diagonal entry) below this proves K not PSD whatever lambda_1 is
    floor = -PSD_TOLERANCE * torch.linalg.matrix_norm(k)
    largest, smallest = _extreme_eigenvalues(
        k, 1, block=_TRACE_BLOCK, min_steps=_psd_steps(len(k), _TRACE_BLOCK), stop_below=floor
    )
    smallest = torch.minimum(smallest, diagonal.min())  # the smallest eigenvalue is at most every diagonal entry
    if smallest < floor:
        raise _not_psd(smallest, largest[0])
    _check_psd(largest[0], smallest)
    return float(diagonal.sum() / largest[0])


def _rank_from_spectrum(eigenvalues: Tensor, method: str) -> float:
    largest = eigenvalues.max()
    _check_psd(largest, eigenvalues.min())
    if method == "trace":
        return float(eigenvalues.sum() / largest)
    clipped = eigenvalues.clamp(min=0)
    p = clipped[clipped > 0] / clipped.sum()
    return math.exp(float(-(p * p.log()).sum()))


def _check_psd(largest: Tensor, smallest: Tensor) -> None:
    if largest <= 0:
        raise KernelError("effective rank is undefined for a kernel without a positive eigenvalue (e.g. all zeros).")
    if smallest < -PSD_TOLERANCE * largest:
        raise _not_psd(smallest, largest)


def _not_psd(smallest: Tensor, largest: Tensor) -> KernelError:
    return KernelError(
        f"kernel is not positive semi-definite: an eigenvalue at or below {float(smallest):.3g} against a largest "
        f"of at least {float(largest):.3g}; effective rank needs a PSD kernel (a Gram matrix)."
    )


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
        kr, kk, rr = _products(k, ref)
        if rr == 0:
            raise KernelError("the relative Frobenius distance is undefined for a zero reference kernel.")
        squared = kk - 2 * kr + rr  # ||K - R||^2 to ~1e-16 (kk + rr): formed explicitly if that loses 6 digits
        if squared < _CANCELLATION * (kk + rr):
            squared = sum(torch.linalg.vector_norm(k[rows] - ref[rows]) ** 2 for rows in _row_blocks(len(k)))
        return float(squared.clamp(min=0).sqrt() / rr.sqrt())
    raise ConfigurationError(f"method must be 'alignment', 'cka' or 'frobenius'; got {method!r}.")


def _extreme_eigenvalues(
    k: Tensor, count: int, *, block: int, min_steps: int, stop_below: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The ``count`` largest eigenvalues of the symmetric ``k`` (descending) and an upper bound on its smallest
    (the smallest Ritz value; the smallest eigenvalue itself when the whole spectrum was computed). Lanczos stops
    early, with the top values uncertified, once a Ritz value falls below ``stop_below``.

    Block Lanczos typically certifies the top ``count`` within a Krylov space of 3 to 5 times ``count``; where that
    would exceed a quarter of n (or n <= DENSE_MAX_N), ``eigvalsh`` is cheaper and exact."""
    n = len(k)
    expected = max(4 * count + 2 * block, min_steps * block)
    if n > DENSE_MAX_N and expected <= min(n // 4, _LANCZOS_MAX_DIM):
        max_dim = min(n // 3, _LANCZOS_MAX_DIM, 4 * expected)
        found = _block_lanczos(k, count, block, min_steps, max_dim, stop_below)
        if found is not None:
            return found
        warnings.warn(
            f"block Lanczos did not certify the {count} largest eigenvalues of the {n} x {n} kernel within a "
            f"Krylov space of {max_dim}; computing the whole spectrum instead (O(n^3)).",
            stacklevel=3,
        )
    values = torch.linalg.eigvalsh(k).flip(0)
    return values[:count], values[-1]


def _block_lanczos(
    k: Tensor, count: int, block: int, min_steps: int, max_dim: int, stop_below: Tensor | None
) -> tuple[Tensor, Tensor] | None:
    """Block Lanczos with full reorthogonalisation, from a seeded Gaussian block: the ``count`` largest Ritz values
    once each is certified (:func:`_certified`) and at least ``min_steps`` blocks were taken, with the smallest Ritz
    value; None if the space reaches ``max_dim`` first. The Rayleigh-Ritz step (an eigh of the m x m projection,
    on the CPU: small LAPACK calls are slow on a GPU and contended on a busy CPU) starts where convergence becomes
    plausible: 3 * count (from the spectra tried, 3 to 5 * count are needed) or min_steps blocks."""
    n = len(k)
    generator = torch.Generator().manual_seed(_LANCZOS_SEED)
    basis, images = k.new_empty(n, max_dim), k.new_empty(n, max_dim)
    projected = k.new_zeros(max_dim, max_dim)
    start = torch.randn(n, block, generator=generator, dtype=k.dtype).to(k.device)
    vectors, m = torch.linalg.qr(start).Q, 0
    while m + block <= max_dim:
        new = slice(m, m + block)
        basis[:, new], images[:, new] = vectors, k @ vectors
        m += block
        q = basis[:, :m]
        projected[:m, new] = q.mT @ images[:, new]
        projected[new, :m] = projected[:m, new].mT
        outside = images[:, new] - q @ projected[:m, new]
        outside -= q @ (q.mT @ outside)
        if m >= max(3 * count, min_steps * block) or m + block > max_dim:
            found = _certified(q, images[:, :m], projected[:m, :m], outside, count, stop_below)
            if found is not None:
                return found
        vectors = _orthonormal_block(outside, q, generator, images[:, new].abs().max())
    return None


def _certified(
    q: Tensor, images: Tensor, projected: Tensor, outside: Tensor, count: int, stop_below: Tensor | None
) -> tuple[Tensor, Tensor] | None:
    """Rayleigh-Ritz on span(Q): the ``count`` largest Ritz values and the smallest if each of the largest has a
    residual ||K Q y - theta Q y|| <= SPECTRUM_TOLERANCE times the largest |Ritz value| (or, early, if the smallest
    is below ``stop_below``), else None. The residual is first estimated as ||W y_last|| (W = ``outside``, the part
    of the last block's image outside span(Q); y_last, the last block's rows of y: the earlier blocks' images lie
    in span(Q)), then recomputed from K Q."""
    theta, y = (t.to(q.device) for t in torch.linalg.eigh(projected.cpu()))
    top, top_y = theta[-count:].flip(0), y[:, -count:].flip(1)
    if stop_below is not None and theta[0] < stop_below:
        return top, theta[0]
    bound = SPECTRUM_TOLERANCE * theta.abs().max()
    if (torch.linalg.vector_norm(outside @ top_y[-outside.shape[1] :], dim=0) > bound).any():
        return None
    if (torch.linalg.vector_norm(images @ top_y - q @ (top_y * top), dim=0) > bound).any():
        return None
    return top, theta[0]


def _orthonormal_block(w: Tensor, q: Tensor, generator: torch.Generator, scale: Tensor) -> Tensor:
    """An orthonormal basis of the columns of ``w`` (already orthogonal to ``q``); a direction that adds nothing
    above rounding (the Krylov space is invariant: a rank-deficient kernel) is replaced by a random one, made
    orthogonal to ``q`` in two passes."""
    vectors, r = torch.linalg.qr(w)
    weak = r.diagonal().abs() <= 1e-10 * scale
    if not weak.any():
        return vectors
    vectors[:, weak] = torch.randn(len(w), int(weak.sum()), generator=generator, dtype=w.dtype).to(w.device)
    for _ in range(2):
        vectors = torch.linalg.qr(vectors - q @ (q.mT @ vectors)).Q
    return vectors


def _psd_steps(n: int, block: int) -> int:
    """Block Lanczos steps after which an eigenvalue below -PSD_GUARANTEE times the largest is found with
    probability >= 1 - PSD_MISS. Kuczyński & Woźniakowski (1992): k steps of Lanczos from one random start estimate
    the extreme eigenvalue to eps (lambda_max - lambda_min) except with probability <= 1.648 sqrt(n)
    exp(-sqrt(eps) (2k - 1)); a block holds ``block`` independent starts, each column's Krylov space inside the
    block's. eps is the error that would still leave the Ritz value below -PSD_TOLERANCE lambda_max; one step is
    added for the start block."""
    eps = (PSD_GUARANTEE - PSD_TOLERANCE) / (1 + PSD_GUARANTEE)
    per_start = PSD_MISS ** (1 / block)
    return math.ceil((math.log(1.648 * math.sqrt(n) / per_start) / math.sqrt(eps) + 1) / 2) + 1


def _pair(k1: Tensor, k2: Tensor, *, square: bool, names: tuple[str, str] = ("k1", "k2")) -> tuple[Tensor, Tensor]:
    check = _square if square else _matrix
    a = check(k1, names[0])
    b = check(k2, names[1]).to(a.device)
    if a.shape != b.shape:
        raise KernelError(
            f"{names[0]} and {names[1]} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    return a, b


def _row_blocks(n: int) -> list[slice]:
    return [slice(i, min(i + _ROWS, n)) for i in range(0, n, _ROWS)]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1)  # a view of a contiguous block, a block-sized copy of a strided one


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """<a, b>_F: one BLAS dot over contiguous matrices, else a block of rows at a time (no n x n temporary)."""
    if a.is_contiguous() and b.is_contiguous():
        return a.view(-1) @ b.view(-1)
    return sum((_flat(a[rows]) @ _flat(b[rows]) for rows in _row_blocks(len(a))), a.new_zeros(()))


def _products(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """<a, b>_F, <a, a>_F, <b, b>_F."""
    return _inner(a, b), _inner(a, a), _inner(b, b)


def _centred_products(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
    r"""<HAH, HBH>_F, ||HAH||_F^2, ||HBH||_F^2 and (||A||_F, ||B||_F).

    From :math:`\langle HAH, HBH\rangle = \langle A, B\rangle - (c_A \cdot c_B + r_A \cdot r_B) / n + s_A s_B / n^2`
    (r, c: row and column sums, s: the total; H is symmetric and idempotent): three dot products and four
    matrix-vector products, never forming HKH. The subtraction loses about log10(||A||^2 / ||HAH||^2) digits; where
    that would exceed 6 (a kernel within 1e-3 of a constant), the centred kernels are formed explicitly instead, a
    block of rows at a time."""
    n = len(a)
    ab, aa, bb = _products(a, b)
    ones = a.new_ones(n)
    rows_a, cols_a, rows_b, cols_b = a @ ones, ones @ a, b @ ones, ones @ b
    sum_a, sum_b = rows_a.sum(), rows_b.sum()
    centred = (
        ab - (cols_a @ cols_b + rows_a @ rows_b) / n + sum_a * sum_b / n**2,
        aa - (cols_a @ cols_a + rows_a @ rows_a) / n + sum_a**2 / n**2,
        bb - (cols_b @ cols_b + rows_b @ rows_b) / n + sum_b**2 / n**2,
    )
    if centred[1] < _CANCELLATION * aa or centred[2] < _CANCELLATION * bb:
        means = [(cols_a / n, rows_a / n, sum_a / n**2), (cols_b / n, rows_b / n, sum_b / n**2)]
        centred = a.new_zeros(3)
        for rows in _row_blocks(n):
            x, y = (_flat(k[rows] - c - r[rows, None] + m) for k, (c, r, m) in zip((a, b), means, strict=True))
            centred += torch.stack((x @ y, x @ x, y @ y))
        centred = centred.unbind()
    return (*centred, (aa.sqrt(), bb.sqrt()))


def _square(kernel: Tensor, name: str) -> Tensor:
    k = _matrix(kernel, name)
    if k.shape[0] != k.shape[1] or k.shape[0] == 0:
        raise KernelError(f"{name} must be a square n x n kernel matrix (n >= 1); got shape {tuple(k.shape)}.")
    return k


def _symmetric(kernel: Tensor, name: str) -> Tensor:
    """The kernel, or (K + K^T)/2 when it is symmetric only up to rounding; the asymmetry is summed over pairs of
    tiles, never forming K - K^T."""
    k = _square(kernel, name)
    tiles = [slice(i, min(i + _TILE, len(k))) for i in range(0, len(k), _TILE)]
    squared = k.new_zeros(())
    for i, rows in enumerate(tiles):
        for cols in tiles[i:]:
            squared += torch.linalg.vector_norm(k[rows, cols] - k[cols, rows].mT) ** 2
    if squared == 0:
        return k
    if squared.sqrt() > SYMMETRY_TOLERANCE * torch.linalg.matrix_norm(k):
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
    # a finite sum proves every entry finite; only an infinite or NaN sum (or an overflowing one) needs the scan
    if not torch.isfinite(kernel.sum()) and not torch.isfinite(kernel).all():
        raise KernelError(f"{name} has non-finite entries (nan or inf); recompute it or check the model.")
    return kernel
