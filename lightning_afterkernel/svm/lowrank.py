"""Exact separability certificate for low-rank kernels: a pivoted Cholesky factor and a linear program.

A kernel of numerical rank r < n (e.g. a conjugate kernel Phi Phi^T with d = 94 features and n = 1,000
examples) is often not separable, and a hard-margin solver then runs until its time limit. This module
decides separability exactly, before any solver, in O(n r^2) plus a linear program:

1. **Pivoted Cholesky** (``pivoted_cholesky``): K = L L^T + R with L (n x r), greedy pivot on the largest
   residual diagonal, stopped when max_i R_ii < ``rank_tol`` * max_i K_ii. The rows L_i are the coordinates
   of phi(x_i) in an orthonormal basis of the pivots' span, and R_ii = ||e_i||^2 is the squared distance of
   phi(x_i) to that span. Directions with residual below ``rank_tol`` * max K_ii are treated as
   numerically absent.
2. **Linear program** (HiGHS) on the span: maximise t over ||w||_inf <= 1 (and a free bias b) subject to
   y_i (L_i . w + b) >= t for all i (rows of L scaled to norm <= 1). t* > 0 iff some direction of the span
   separates the data; then the data is separable and the hard-margin solver runs. It is solved on a working
   set of examples (the pivots plus a seeded random sample, ``WORKING_SET``), adding the examples that its
   solution separates by less than its t until that solution separates all n, or the working set alone is
   not separable (then neither is the whole set).
3. **Verified certificate** when t* = 0: the LP's dual is a convex combination u (u >= 0, sum u = 1, and
   sum_i u_i y_i = 0 with a bias) with sum_i u_i y_i L_i = 0. With z = u * y and q = z^T K z, every
   separator y_i (w . phi(x_i) + b) >= 1 satisfies 1 <= w . sum_i z_i phi(x_i) <= ||w|| sqrt(q), so its
   geometric margin 1 / ||w|| is at most sqrt(q). q is computed in float64 from K itself (not from L), and
   ``NotSeparableError`` is raised only when q <= ``rank_tol`` * max K_ii: every separator of K has a
   geometric margin below sqrt(rank_tol) times the largest feature norm. (For exact arithmetic and a PSD
   residual, q = z^T R z <= max R_ii, so this always holds when the span is not separable.)

Choice of ``RANK_TOL`` = 1e-5: kernels here are usually computed in float32. On ReLU features (d = 32 to
300, n = 1,000 to 5,000, and the quickstart's trained and initial conjugate kernels on real MNIST) the
pivoted Cholesky of the float32 kernel produced "phantom" pivots (absent in the float64 kernel of the same
features) up to 3.2e-6 of max K_ii, never above; 1e-5 leaves them out with a factor 3 to spare, while
1e-6 counted up to 6 of them. A separation that needs the directions below 1e-5 has a geometric margin
below sqrt(1e-5) ~ 3.2e-3 of the largest feature norm, comparable to the ~1.8e-3 scale of the float32
phantom features, so it is not trusted. For kernels computed in float64, a smaller ``rank_tol`` (e.g.
1e-9) may be passed to ``HardMarginSVM``.

Cost (2 CPU cores): the factorisation is O(n r^2) time and r n floats (n = 12,000, r = 100: 0.02 s). An LP
grows ~r^3 (HiGHS on a dense (4 r) x r working set: r = 100: 0.1 s, r = 200: 0.3 s, r = 400: 1.7 s,
r = 800: > 20 s). Refusing a non-separable kernel takes one LP (0.1 s at r = 100, 0.3-0.4 s at r = 200, any
n up to 12,000); proving a separable one takes a few rounds (r = 100: 0.1-0.5 s; r = 200: 1.7-2.4 s at
n = 4,500-11,000), bounded by ``LP_SECONDS``. Ranks above ``MAX_RANK`` (or above n / 2, where by Cover's
counting argument generic labels are separable anyway) skip the certificate: a factorisation of a principal
submatrix of cap + 50 examples already reaches the cap (``SUBSET_EXTRA``), O(cap^3) (under 1 ms at any n), which
is all that full-rank kernels (NTK, RBF) pay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack
from scipy.optimize import linprog

from lightning_afterkernel.errors import NotSeparableError

RANK_TOL = 1e-5
"""Default ``rank_tol``: float32 round-off never reached it in the pivoted Cholesky (see the module docstring)."""

MAX_RANK = 200
"""Largest rank r certified (and never more than n / 2): the LP's cost grows like r^3."""

SUBSET_EXTRA = 50
"""Full-rank kernels are recognised on a principal submatrix of cap + SUBSET_EXTRA evenly spaced examples: when
LAPACK's pivoted Cholesky (``dpstrf``, the same greedy rule and stopping threshold as ``pivoted_cholesky``)
finds rank > cap there (a rank of exactly cap is still certified), K's rank is at least that (a principal
submatrix cannot have more), and the certificate is skipped after ~(cap + 50)^3 / 3 flops (under 1 ms) instead
of n cap^2 (n = 2,000: 7 ms; 12,000: 60 ms). Should the greedy factorisation of K ever stop at or below the cap
where the submatrix's did not, the certificate is skipped and the solver decides: slower, never wrong."""

LP_SECONDS = 5.0
"""Time budget of the LP rounds (also bounded by the caller's time limit); past it the result is undecided."""

WORKING_SET = 1000
"""The LP starts on the r pivots plus max(WORKING_SET, 4 r) random examples; each round adds at most that many
examples (those with the smallest margins under the current solution)."""

MAX_ROUNDS = 50
"""Working-set rounds before the certificate gives up (inconclusive)."""

LP_TOL = 1e-7
"""t* <= LP_TOL (HiGHS's primal feasibility tolerance) counts as "no separating direction in the span";
a separator must separate every example by more than LP_TOL (rows of norm <= 1, ||w||_inf <= 1)."""


@dataclass(frozen=True)
class Certificate:
    """Outcome of ``certify_separability`` when it does not raise.

    Attributes:
        rank: numerical rank r of K at ``rank_tol`` (None when above the cap: certificate skipped).
        separable: True when a direction of the span separates the data, None when undecided (rank above
            the cap, LP time limit, or an unverifiable LP answer): the hard-margin solver decides.
        seconds: time spent.
    """

    rank: int | None
    separable: bool | None
    seconds: float


def pivoted_cholesky(
    K: np.ndarray, rank_tol: float, max_rank: int, threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Partial Cholesky factor L (n x r) with K ~ L L^T, greedy pivot on the largest residual diagonal.

    Stops at the first r with max_i (K - L L^T)_ii < ``threshold`` (default rank_tol * max_i K_ii) and returns
    (L, pivot indices); returns None if that takes more than ``max_rank`` columns. O(n r^2) time,
    max_rank * n floats; reads only K's diagonal and pivot rows.
    """
    n = K.shape[0]
    residual = np.diagonal(K).copy()
    if threshold is None:
        threshold = rank_tol * float(residual.max())
    rows = np.empty((max_rank, n))  # rows[k] is column k of L
    pivots = []
    while True:
        k = len(pivots)
        i = int(np.argmax(residual))
        if residual[i] < threshold:
            return np.ascontiguousarray(rows[:k].T), np.array(pivots, dtype=np.intp)
        if k == max_rank:
            return None
        col = K[i] - rows[:k, i] @ rows[:k]
        col /= np.sqrt(residual[i])
        rows[k] = col
        residual -= col * col
        residual[i] = 0.0
        pivots.append(i)


def _max_margin_lp(
    L: np.ndarray, y: np.ndarray, fit_intercept: bool, time_limit: float, method: str = "highs-ds"
) -> tuple[float, np.ndarray, float, np.ndarray] | None:
    """max t s.t. y_i (L_i w + b) >= t, ||w||_inf <= 1; returns (t, w, b, u) or None (time limit / failure).

    u >= 0 are the constraints' dual values (sum u = 1 at the optimum, since t is free). ``method``: HiGHS's
    dual simplex is fastest when the working set is not separable, its interior-point method (with crossover)
    on the larger, separable working sets of later rounds (~1.3-1.6x at r = 200-300).
    """
    m, r = L.shape
    blocks = [-(y[:, None] * L)]
    if fit_intercept:
        blocks.append(-y[:, None])
    blocks.append(np.ones((m, 1)))
    A = np.hstack(blocks)
    c = np.zeros(A.shape[1])
    c[-1] = -1.0
    bounds = [(-1.0, 1.0)] * r + [(None, None)] * (A.shape[1] - r)
    res = linprog(c, A_ub=A, b_ub=np.zeros(m), bounds=bounds, method=method, options={"time_limit": time_limit})
    if res.status != 0:
        return None
    x = res.x
    b = float(x[r]) if fit_intercept else 0.0
    return float(x[-1]), x[:r], b, np.maximum(-res.ineqlin.marginals, 0.0)


def _hull_certificate(
    K: np.ndarray, y: np.ndarray, idx: np.ndarray, u: np.ndarray, fit_intercept: bool
) -> tuple[float, int] | None:
    """q = z^T K z for z = u * y with u on the simplex (balanced between the classes with a bias).

    Every separator of K has geometric margin <= sqrt(q). Returns (q, support size) or None if u is unusable.
    """
    keep = u > 0
    idx, u, ys = idx[keep], u[keep], y[idx[keep]]
    if fit_intercept:
        pos, neg = ys > 0, ys < 0
        if not (pos.any() and neg.any()):
            return None
        u = np.where(pos, 0.5 * u / u[pos].sum(), 0.5 * u / u[neg].sum())
    else:
        if u.sum() <= 0.0:
            return None
        u = u / u.sum()
    z = u * ys
    return float(z @ K[np.ix_(idx, idx)] @ z), int(idx.size)


@dataclass(frozen=True)
class KernelFactor:
    """The label-independent part of the certificate: K's pivoted Cholesky factor (``kernel_factor``).

    Attributes:
        L: (n, r) factor scaled by 1 / sqrt(max_i K_ii) (rows of norm <= 1), or None when the rank is above
            the cap (the certificate is skipped).
        pivots: (r,) the pivot indices, or None with L.
    """

    L: np.ndarray | None
    pivots: np.ndarray | None


def kernel_factor(K: np.ndarray, rank_tol: float, max_rank: int | None = None) -> KernelFactor:
    """K's pivoted Cholesky factor at ``rank_tol``, or an empty ``KernelFactor`` when the rank exceeds the cap
    (default min(MAX_RANK, n // 2)); full-rank kernels are recognised on a submatrix (``SUBSET_EXTRA``)."""
    n = K.shape[0]
    cap = min(MAX_RANK, n // 2) if max_rank is None else max_rank
    threshold = rank_tol * float(np.diagonal(K).max())
    if n > cap + SUBSET_EXTRA:
        subset = np.linspace(0, n - 1, cap + SUBSET_EXTRA).astype(np.intp)
        if lapack.dpstrf(K[np.ix_(subset, subset)], tol=threshold)[2] > cap:
            return KernelFactor(L=None, pivots=None)  # full rank: skip
    factor = pivoted_cholesky(K, rank_tol, cap, threshold)
    if factor is None:
        return KernelFactor(L=None, pivots=None)
    L, pivots = factor
    L /= np.sqrt(float(np.diagonal(K).max()))
    return KernelFactor(L=L, pivots=pivots)


def certify_separability(
    K: np.ndarray,
    y: np.ndarray,
    fit_intercept: bool,
    rank_tol: float,
    time_limit: float | None = None,
    max_rank: int | None = None,
    factor: KernelFactor | None = None,
) -> Certificate:
    """Decide hard-margin separability of a low-rank kernel exactly (see the module docstring).

    Args:
        K: (n, n) symmetric float64 kernel.
        y: (n,) labels in {-1.0, +1.0}.
        fit_intercept: separators with a free bias b.
        rank_tol: relative residual below which a direction counts as numerically absent.
        time_limit: seconds for the factor and the linear programs (at most ``LP_SECONDS``); on expiry the
            result is undecided.
        max_rank: rank cap (default: min(MAX_RANK, n // 2)).
        factor: ``kernel_factor(K, rank_tol, max_rank)`` when already computed (shared by the problems of a
            one-vs-rest fit); None computes it here.

    Raises:
        NotSeparableError: the kernel has numerical rank r < n and no direction of its span separates the
            data; the message gives r, n and the verified bound on every separator's margin.
    """
    start = time.perf_counter()
    n = K.shape[0]
    budget = LP_SECONDS if time_limit is None else min(LP_SECONDS, time_limit)
    if factor is None:
        factor = kernel_factor(K, rank_tol, max_rank)
    if factor.L is None or factor.pivots is None:
        return Certificate(rank=None, separable=None, seconds=time.perf_counter() - start)
    L, pivots = factor.L, factor.pivots
    r = L.shape[1]
    max_diag = float(np.diagonal(K).max())
    chunk = max(WORKING_SET, 4 * r)
    sample = np.random.default_rng(0).permutation(n)[:chunk]
    one_per_class = [int(np.argmax(y > 0)), int(np.argmax(y < 0))]
    work = np.union1d(np.union1d(pivots, sample), one_per_class)
    for round_ in range(MAX_ROUNDS):
        remaining = budget - (time.perf_counter() - start)
        if remaining <= 0:
            break
        sol = _max_margin_lp(L[work], y[work], fit_intercept, remaining, "highs-ds" if round_ == 0 else "highs-ipm")
        if sol is None:
            break
        t, w, b, u = sol
        if t > LP_TOL:
            margins = y * (L @ w + b)
            outside = np.ones(n, dtype=bool)
            outside[work] = False
            if not (outside & (margins <= LP_TOL)).any():
                # Every example is separated by w (the working set's up to HiGHS's tolerance: checked here).
                separable = True if margins.min() > 0.0 else None
                return Certificate(rank=r, separable=separable, seconds=time.perf_counter() - start)
            binding = np.flatnonzero(outside & (margins < t))  # the examples that would lower t, worst first
            work = np.union1d(work, binding[np.argsort(margins[binding])[:chunk]])
            continue
        cert = _hull_certificate(K, y, work, u, fit_intercept)
        if cert is None or cert[0] > rank_tol * max_diag:
            break
        q, support = cert
        bound = np.sqrt(max(q, 0.0) / max_diag)
        raise NotSeparableError(
            f"the training data is not separable by this kernel: K has numerical rank r = {r} < n = {n} "
            f"(pivoted Cholesky; directions with residual below rank_tol = {rank_tol:g} of max K_ii are numerically "
            f"absent), and no direction in its span separates the data{' with a bias' if fit_intercept else ''} "
            f"(linear program). Certificate: a convex combination of {support} examples' signed features y_i phi_i "
            f"is (numerically) zero, so every separator of K has a geometric margin <= {bound:.1e} times the largest "
            "feature norm. Use a kernel with more features (higher rank), fewer training points, or the "
            "soft-margin fallback SoftMarginSVM.",
            best_margin=None,
        )
    return Certificate(rank=r, separable=None, seconds=time.perf_counter() - start)
