"""Input validation shared by the SVM estimators and backends.

Kernels arrive as numpy arrays or torch tensors (any device, any real dtype) and leave as float64
C-contiguous numpy arrays (train kernels: a new array owned by the caller of these checks). Labels arrive
in {0, 1}, {-1, +1} or bool (two classes) or as any integers or strings (more), and leave with their sorted
``classes``; each binary problem's y is in {-1.0, +1.0} (``binary_targets``; for two classes ``classes[1]`` is +1).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from lightning_afterkernel.errors import DataError, KernelError, NotSeparableError

SYMMETRY_RTOL = 1e-4
"""Largest accepted max_ij |K_ij - K_ji| relative to max_ij |K_ij|: room for float32 rounding in
kernels built block by block, while a cross kernel passed by mistake is asymmetric at O(1).
K is then symmetrised, (K + K^T) / 2."""

MAX_NORM_SQ = 1e9
"""Pre-check limit: training sets whose separators provably need ||w||^2 > MAX_NORM_SQ / mean K_ii
are refused as not separable: a geometric margin below ~3e-5 of the mean feature norm (exact or
near-exact duplicates). Duplicates blurred by float32 rounding beyond that are left to the solver's
time limit."""

PSD_SLACK = 1e-5
"""Room (relative to max K_ii) for computed kernel entries above the Cauchy-Schwarz bound in the pre-check."""

MAX_CANDIDATE_SHARE = 0.1
"""The pre-check checks every opposite-label pair once more than this share of them have close norms."""


PSD_CHECK_SIZE = 1000
"""The negative-eigenvalue warning looks at a principal submatrix of m = min(n, PSD_CHECK_SIZE,
max(PSD_MIN_SIZE, n // 8)) evenly spaced examples: one Cholesky of m x m (m^3 / 3 flops; at most 1/512 of a
full-size factorisation) after ``PSD_POWER_STEPS`` products with it. By Cauchy interlacing,
lambda_min(K) <= lambda_min of any principal submatrix, so an eigenvalue found there is in K too."""

PSD_MIN_SIZE = 300
"""Smallest submatrix of the negative-eigenvalue warning (all of K below it)."""

PSD_POWER_STEPS = 10
"""Power iterations for the lambda_max estimate of the warning's threshold (a lower bound: a smaller threshold
makes the warning more sensitive, never less; kernels' top eigenvalue is well separated, so 10 suffice)."""

PSD_RTOL = 1e-6
"""Warn when (a principal submatrix of) K has an eigenvalue below -PSD_RTOL * lambda_max."""


def _count_nonfinite(a: np.ndarray, name: str) -> None:
    n_bad = a.size - int(np.count_nonzero(np.isfinite(a)))
    if n_bad:
        raise KernelError(
            f"{name} contains {n_bad} non-finite entries (NaN/inf) out of {a.size}; recompute the kernel "
            "(a diverged model or a float16 overflow produces them)."
        )


def _read_only_view(x: object, name: str) -> np.ndarray:
    """The input as a numpy array in its own dtype, without a copy where possible (CPU tensors are shared)."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise KernelError(f"{name} is a complex tensor; pass a real-valued kernel.")
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _exactly_symmetric(src: torch.Tensor, block: int = 512) -> bool:
    """src == src^T entry for entry (False when it holds a NaN), compared block pair by block pair.

    512 x 512 blocks keep the transposed reads in the cache; ``torch.equal`` (two threads) took 57 ms at
    n = 12,000 in float32 and 2.2 ms at 2,000, numpy's ``array_equal`` 96 and 3.4."""
    n = src.shape[0]
    for i0 in range(0, n, block):
        for j0 in range(i0, n, block):
            if not torch.equal(src[i0 : i0 + block, j0 : j0 + block], src[j0 : j0 + block, i0 : i0 + block].T):
                return False
    return True


def _torch_view(src: np.ndarray) -> torch.Tensor | None:
    """src as a CPU tensor sharing its memory, or None (a dtype or strides torch cannot share: negative, or not a
    multiple of the item size as in a field of a record array)."""
    if src.dtype not in (np.float32, np.float64) or any(st < 0 or st % src.itemsize for st in src.strides):
        return None
    with warnings.catch_warnings():  # read-only inputs (np.load(mmap_mode="r")) are only read through it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(src)


def _scaled_copy(src: np.ndarray, source: torch.Tensor | None, out: np.ndarray, scale: float) -> None:
    """out = src / scale in float64, through ``source`` (src's ``_torch_view``) when torch can share src: two
    threads; numpy's casting copy is one-threaded and 1.5x slower."""
    if source is None:
        np.divide(src, scale, out=out, dtype=np.float64)
        return
    target = torch.from_numpy(out)
    for r0 in range(0, out.shape[0], 64):  # each chunk divided while still in the cache: 1.2x faster
        chunk = target[r0 : r0 + 64].copy_(source[r0 : r0 + 64])
        if scale != 1.0:
            chunk.div_(scale)


def _symmetrized_copy(
    src: np.ndarray, pad: int, scale: float = 1.0, block: int = 256
) -> tuple[np.ndarray, float, float]:
    """(K, asym, kmax): K = (src + src^T) / (2 scale) in float64 (the top-left corner of an (n + pad)^2
    buffer), max |src_ij - src_ji| / scale and max |K_ij|; asym and kmax are inf when src holds a NaN or inf.

    Exactly symmetric input (every kernel built by mirroring tiles, e.g. ``empirical_ntk``'s) is recognised by
    one blocked comparison and copied once (n = 12,000 float32: 0.2 s in all). Otherwise: one contiguous
    copy, then one in-place pass over pairs of blocks (small enough for the cache: at n = 12,000 the pass
    takes about as long as the copy; larger blocks or a fused copy were 2-4x slower)."""
    n = src.shape[0]
    out = np.empty((n + pad, n + pad))[:n, :n]
    source = _torch_view(src)
    if source is not None:
        lo, hi = torch.aminmax(source)
        kmax = max(float(hi), -float(lo)) / scale
        if np.isfinite(kmax) and _exactly_symmetric(source):
            _scaled_copy(src, source, out, scale)
            return out, 0.0, kmax
    _scaled_copy(src, source, out, scale)
    asym, kmax = 0.0, 0.0
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        for j0 in range(i0, n, block):
            j1 = min(j0 + block, n)
            upper, lower_t = out[i0:i1, j0:j1], out[j0:j1, i0:i1].T
            with np.errstate(invalid="ignore", over="ignore"):  # NaN or inf if any entry is: reported below
                avg = upper - lower_t
                block_asym = max(float(avg.max()), -float(avg.min()))
                avg *= -0.5
                avg += upper
                block_max = max(float(avg.max()), -float(avg.min()))
            if not (np.isfinite(block_asym) and np.isfinite(block_max)):
                return out, np.inf, np.inf
            asym, kmax = max(asym, block_asym), max(kmax, block_max)
            if block_asym > 0.0:  # kernels built by mirroring tiles are exactly symmetric: no writes
                upper[...] = avg
                lower_t[...] = avg
    return out, asym, kmax


def check_kernel(K: object, name: str = "K", pad: int = 0) -> np.ndarray:
    """Validate a train-train kernel and return a symmetrised float64 copy owned by the caller.

    See ``check_and_normalize_kernel`` (this is it with ``normalize=False``, returning only K).
    """
    return check_and_normalize_kernel(K, name, pad, normalize=False)[0]


def check_and_normalize_kernel(
    K: object, name: str = "K", pad: int = 0, normalize: bool = True
) -> tuple[np.ndarray, float]:
    """Validate a train-train kernel; return (K / s symmetrised in float64, s), the copy owned by the caller.

    s = (mean_i sqrt(K_ii))^2 with ``normalize`` (the squared mean feature norm), else 1. One pass reads K
    (numpy or torch, any real dtype, any device) and writes (K + K^T) / (2 s) in float64. With ``pad`` > 0 the
    copy is the top-left n x n corner of an (n + pad) x (n + pad) buffer (a view), so that the SMO's no-bias
    emulation (``sklearn_backend.no_bias_problem``, pad = 2) needs no second n^2 copy.

    Raises:
        KernelError: not 2-D square, empty, not finite, all zeros, asymmetric beyond
            ``SYMMETRY_RTOL``, a negative diagonal entry or none positive (K_ii = ||phi(x_i)||^2).
    """
    src = _read_only_view(K, name)
    if src.dtype.kind not in "biuf":
        raise KernelError(f"{name} must be a real numeric array; got dtype {src.dtype}.")
    if src.ndim != 2 or src.shape[0] != src.shape[1]:
        raise KernelError(
            f"{name} must be a square n x n train-train kernel; got shape {src.shape}. Compute it as "
            "K(X_train, X_train)."
        )
    if src.shape[0] == 0:
        raise KernelError(f"{name} is empty (shape {src.shape}); pass at least one example per class.")
    diag = np.diagonal(src).astype(np.float64)
    scale = 1.0
    if normalize and np.isfinite(diag).all() and diag.min() >= 0.0 and diag.max() > 0.0:
        scale = float(np.sqrt(diag).mean() ** 2)
    K, asym, kmax = _symmetrized_copy(src, pad, scale)
    if not (np.isfinite(asym) and np.isfinite(kmax)):
        _count_nonfinite(src, name)
        raise KernelError(f"{name} has entries too large for float64 arithmetic (overflow); rescale it.")
    if kmax == 0.0:
        raise KernelError(f"{name} is all zeros; the model's features or gradients vanished.")
    if asym > SYMMETRY_RTOL * kmax:
        raise KernelError(
            f"{name} is not symmetric: max |K_ij - K_ji| = {asym * scale:.3g} ({asym / kmax:.2g} of max |K_ij|, "
            f"tolerance {SYMMETRY_RTOL:g}). Pass the train-train kernel K(X_train, X_train), not a cross "
            "kernel, and with rows and columns in the same order."
        )
    if diag.max() <= 0.0:
        raise KernelError(
            f"{name} has no positive diagonal entry; a kernel's diagonal is ||phi(x_i)||^2, so all feature "
            "vectors are zero. Check how the kernel was computed."
        )
    if diag.min() < 0.0:
        i = int(np.argmin(diag))
        raise KernelError(
            f"{name} has {int(np.count_nonzero(diag < 0))} negative diagonal entries (e.g. {name}[{i}, {i}] = "
            f"{diag[i]:.3g}); a kernel's diagonal is ||phi(x_i)||^2 >= 0. Check how the kernel was computed."
        )
    return K, scale


def check_cross_kernel(K_cross: object, n_train: int) -> np.ndarray:
    """Validate a test-train kernel (n_test x n_train) and return it as float64."""
    K_cross = _read_only_view(K_cross, "K_cross")
    if K_cross.dtype.kind not in "biuf":
        raise KernelError(f"K_cross must be a real numeric array; got dtype {K_cross.dtype}.")
    K_cross = np.ascontiguousarray(K_cross, dtype=np.float64)
    if K_cross.ndim != 2:
        raise KernelError(
            f"K_cross must be 2-D (n_test x n_train); got shape {K_cross.shape}. "
            "For a single example pass K_cross[None, :]."
        )
    if K_cross.shape[1] != n_train:
        raise KernelError(
            f"K_cross must have n_train columns (one per training example) = {n_train}; got shape "
            f"{K_cross.shape}. Compute it as K(X_test, X_train) with the training set used in fit."
        )
    _count_nonfinite(K_cross, "K_cross")
    return K_cross


def check_labels(y: object, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate class labels; return (labels as a 1-D numpy array, classes: the sorted distinct labels).

    Two classes must be {0, 1}, {-1, 1} (ints or floats) or bool (``binary_targets`` maps ``classes[1]`` to +1);
    three or more may be any integers (also as integral floats) or strings (one-vs-rest).
    """
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"y must be 1-D with one label per training example; got shape {y.shape}.")
    if y.shape[0] != n:
        raise DataError(f"y has {y.shape[0]} labels but K is {n} x {n}; pass one label per row of K.")
    classes = np.unique(y) if y.dtype.kind in "biufUS" else np.empty(0)
    if classes.size > 2:
        bad = (~np.isfinite(classes) | (classes != np.round(classes))) if y.dtype.kind == "f" else None
        if bad is not None and bad.any():
            shown = ", ".join(repr(v) for v in classes[bad][:5].tolist())
            raise DataError(
                f"y holds {classes.size} distinct labels, some not integers ({shown}); class labels must be "
                "integers (or strings). Map each class to an integer."
            )
        return y, classes
    if y.dtype.kind not in "biuf":
        raise DataError(
            f"y must hold labels in {{0, 1}}, {{-1, 1}} or bool for two classes (integers or strings for three or "
            f"more); got dtype {y.dtype}."
        )
    values = set(classes.tolist())
    if not (values <= {0, 1} or values <= {-1, 1}):
        shown = ", ".join(repr(v) for v in classes[:5].tolist())
        raise DataError(
            f"y must hold binary labels in {{0, 1}}, {{-1, 1}} or bool; found {shown}. Map your two classes to 0 and 1."
        )
    if classes.size < 2:
        raise DataError(f"y holds a single class ({classes[0]!r}); a classifier needs examples of both classes.")
    return y, classes


def binary_targets(y: np.ndarray, positive: object) -> np.ndarray:
    """y_i in {-1.0, +1.0}: +1 where the label is ``positive``."""
    return np.where(y == positive, 1.0, -1.0)


def check_separable_precheck(K: np.ndarray, y: np.ndarray, fit_intercept: bool, block: int = 1024) -> None:
    """Refuse training sets that no hard margin can separate, before solving (no solve).

    Two bounds on ||w||^2 of any separator, with d_ij = K_ii + K_jj - 2 K_ij = ||phi_i - phi_j||^2:
    opposite labels force w . (phi_i - phi_j) = +-2 or more, so ||w||^2 >= 4 / d_ij; without a bias,
    y_i w . phi_i >= 1 forces ||w||^2 >= 1 / K_ii. Either bound above ``MAX_NORM_SQ / mean K_ii``
    (e.g. duplicated examples with opposite labels) raises.

    Only pairs with nearly equal feature norms can be that close: d_ij >= (||phi_i|| - ||phi_j||)^2 - 2 eta
    (Cauchy-Schwarz, with eta = ``PSD_SLACK`` * max K_ii of room for a computed K_ij slightly above
    ||phi_i|| ||phi_j||). So the pairs are found through the sorted norms (O(n log n) plus the candidates) and
    only when most pairs are candidates (e.g. a normalised kernel, all K_ii equal) is every opposite-label
    pair checked, in blocks of rows (O(n^2)). A pair missed because its K_ij breaks Cauchy-Schwarz by more
    than eta costs time, never a wrong answer: the solvers detect non-separability themselves.

    Raises:
        NotSeparableError: with the offending indices.
    """
    diag = np.diagonal(K)
    limit = MAX_NORM_SQ / float(diag.mean())
    if not fit_intercept:
        tiny = np.flatnonzero(diag <= 1.0 / limit)
        if tiny.size:
            raise NotSeparableError(
                f"{tiny.size} training examples have a (numerically) zero feature vector (e.g. K[{tiny[0]}, "
                f"{tiny[0]}] = {diag[tiny[0]]:.3g}): without a bias their decision value is 0, so no hard "
                "margin exists. Remove them or use fit_intercept=True."
            )
    d_limit = 4.0 / limit
    pairs = _close_norm_pairs(diag, y, d_limit + 2.0 * PSD_SLACK * float(diag.max()))
    if pairs is None:
        _check_all_opposite_pairs(K, y, diag, d_limit, block)
        return
    rows, cols = pairs
    first, count = None, 0
    for c0 in range(0, rows.size, block * block):
        i, j = rows[c0 : c0 + block * block], cols[c0 : c0 + block * block]
        dist = diag[i] + diag[j] - 2.0 * K[i, j]
        hit = np.flatnonzero(dist <= d_limit)
        if hit.size and first is None:
            first = (int(i[hit[0]]), int(j[hit[0]]), float(dist[hit[0]]))
        count += hit.size
    if first is not None:
        _raise_duplicates(*first, count, float(diag.mean()))


def _close_norm_pairs(diag: np.ndarray, y: np.ndarray, window_sq: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Opposite-label pairs (i, j) with (sqrt K_ii - sqrt K_jj)^2 <= window_sq, or None when they are more than
    ``MAX_CANDIDATE_SHARE`` of all opposite-label pairs."""
    norms = np.sqrt(np.maximum(diag, 0.0))
    pos, neg = np.flatnonzero(y > 0), np.flatnonzero(y < 0)
    neg = neg[np.argsort(norms[neg], kind="stable")]
    sorted_neg = norms[neg]
    width = float(np.sqrt(window_sq))
    lo = np.searchsorted(sorted_neg, norms[pos] - width, side="left")
    hi = np.searchsorted(sorted_neg, norms[pos] + width, side="right")
    counts = hi - lo
    total = int(counts.sum())
    if total > MAX_CANDIDATE_SHARE * pos.size * neg.size:
        return None
    rows = np.repeat(pos, counts)
    offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = neg[np.repeat(lo, counts) + offsets]
    return rows, cols


def _check_all_opposite_pairs(K: np.ndarray, y: np.ndarray, diag: np.ndarray, d_limit: float, block: int) -> None:
    """The pre-check on every opposite-label pair, in blocks of rows (O(n^2))."""
    pos, neg = np.flatnonzero(y > 0), np.flatnonzero(y < 0)
    diag_neg = diag[neg]
    for p0 in range(0, pos.size, block):
        rows = pos[p0 : p0 + block]
        dist = K[np.ix_(rows, neg)]
        dist *= -2.0
        dist += diag[rows, None]
        dist += diag_neg
        if dist.min() <= d_limit:
            hit = np.argwhere(dist <= d_limit)
            i, j = int(rows[hit[0, 0]]), int(neg[hit[0, 1]])
            _raise_duplicates(i, j, float(dist[hit[0, 0], hit[0, 1]]), hit.shape[0], float(diag.mean()))


def _raise_duplicates(i: int, j: int, dist: float, count: int, mean_diag: float) -> None:
    raise NotSeparableError(
        f"the training data is not separable by this kernel: at least {count} pairs of examples with opposite "
        f"labels have (numerically) identical feature vectors, e.g. examples {i} and {j} "
        f"(||phi_i - phi_j||^2 = {dist:.3g}, mean K_ii = {mean_diag:.3g}). Remove duplicated examples with "
        "conflicting labels, or fix the labels.",
        best_margin=None,
    )


def warn_if_indefinite(K: np.ndarray) -> None:
    """Warn (UserWarning) when K is clearly indefinite.

    Checked on the principal submatrix S of every ``step``-th example (see ``PSD_CHECK_SIZE``): lambda_max(S)
    from ``PSD_POWER_STEPS`` power iterations (a lower bound), then one Cholesky of S + PSD_RTOL * lambda_max * I, which
    fails iff S has an eigenvalue below -PSD_RTOL * lambda_max; K then has one at least as negative. In torch:
    scipy's OpenBLAS threads were erratic beside torch's on 2 busy cores (0.03-1.9 s for this 1,000 x 1,000
    Cholesky).
    """
    n = K.shape[0]
    step = -(-n // min(n, PSD_CHECK_SIZE, max(PSD_MIN_SIZE, n // 8)))
    S = torch.from_numpy(np.array(K[::step, ::step]))  # a copy: its diagonal is shifted below
    v = torch.full((S.shape[0],), 1.0 / np.sqrt(S.shape[0]), dtype=torch.float64)
    lam = 0.0
    for _ in range(PSD_POWER_STEPS):
        v = S @ v
        lam = float(torch.linalg.vector_norm(v))
        if lam == 0.0:
            return
        v /= lam
    S.diagonal().add_(PSD_RTOL * lam)
    if int(torch.linalg.cholesky_ex(S)[1]) != 0:
        warnings.warn(
            f"K is not positive semi-definite: it has an eigenvalue below -{PSD_RTOL:g} * lambda_max "
            f"(lambda_max ~ {lam:.3g}). A hard-margin SVM assumes a PSD kernel; the solver may fail or return "
            "a meaningless solution. Recompute the kernel in float64 or check how it was built.",
            UserWarning,
            stacklevel=3,
        )


def separation_bound(K: np.ndarray, y: np.ndarray, alpha: np.ndarray, fit_intercept: bool) -> float:
    """Upper bound on every separator's geometric margin, from any alpha >= 0, in units of sqrt(mean K_ii).

    With u = alpha / 1^T alpha (with a bias: each class's part scaled to total 1/2, so that sum_i u_i y_i = 0)
    and z = u * y, every separator y_i (w . phi(x_i) + b) >= 1 satisfies 1 <= w . sum_i z_i phi(x_i) <=
    ||w|| sqrt(z^T K z), so its geometric margin 1 / ||w|| is at most sqrt(z^T K z). Returns
    sqrt(z^T K z / mean K_ii) in float64 (inf when alpha has no weight on some class it needs). Alphas that
    diverge along a combination of examples whose signed features cancel (non-separable data) make it ~0.
    """
    pos = y > 0
    if fit_intercept:
        mass_pos, mass_neg = float(alpha[pos].sum()), float(alpha[~pos].sum())
        if not (mass_pos > 0.0 and mass_neg > 0.0):
            return np.inf
        u = alpha * np.where(pos, 0.5 / mass_pos, 0.5 / mass_neg)
    else:
        total = float(alpha.sum())
        if not total > 0.0:
            return np.inf
        u = alpha / total
    support = np.flatnonzero(u)
    z = u[support] * y[support]
    q = float(z @ (K[np.ix_(support, support)] @ z))
    return float(np.sqrt(max(q, 0.0) / float(np.diagonal(K).mean())))


def training_margins(K: np.ndarray, y: np.ndarray, alpha: np.ndarray, intercept: float) -> np.ndarray:
    """Functional margins m_i = y_i (sum_j alpha_j y_j K_ij + b) in float64."""
    return y * (K @ (alpha * y) + intercept)
