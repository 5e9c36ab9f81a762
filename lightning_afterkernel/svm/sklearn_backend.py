"""scikit-learn (libsvm SMO) backend: ``SVC(kernel="precomputed")`` with a huge box bound C.

Hard margin (``fit_dual``) = soft margin with C above every dual coefficient: C = ``C_REL / mean_i K_ii``.
The soft margin itself (``fit_soft_dual``) uses the caller's C; both share ``_solve``.

**With a bias** (``fit_intercept=True``) libsvm solves exactly the dual

    max_a 1^T a - 1/2 a^T Q a   s.t.  y^T a = 0,  0 <= a <= C,   Q = diag(y) K diag(y).

**Without a bias** (``fit_intercept=False``, the paper's formulation) the dual has no equality
constraint, which libsvm always imposes. Adding a constant c to K does *not* remove it: under
y^T a = 0, a^T Y (K + c 11^T) Y a = a^T Q a, so K + c gives the same alpha as K, i.e. the biased SVM.
Instead we append two virtual examples that soak up y^T a at no cost: feature +s u with label +1 and
-s u with label -1, u orthogonal to every phi(x_i), i.e. the (n + 2) x (n + 2) kernel

    [[K, 0, 0], [0, s^2, -s^2], [0, -s^2, s^2]].

Both have y phi = s u, so with A = a_+ + a_- and D = a_+ - a_- the augmented dual is

    1^T a - 1/2 a^T Q a + (A - s^2 A^2 / 2)   s.t.  y^T a + D = 0,  |D| <= A.

For fixed a, the bracket is maximised at A = 1/s^2 =: B, feasible whenever |y^T a| <= B; so the real
alphas are *exactly* the no-bias optimum as long as |y^T a*| < B, and then both virtual examples are
free support vectors, which forces libsvm's b to 0. The virtual examples need their own box: a_+- =
(B -+ y^T a) / 2 must stay below it, so it is max(C, B) (libsvm's per-example C_i = C * sample_weight_i).
Hard margin: B = ``ABSORBER_REL / mean_i K_ii`` (< C) and we check |y^T a| < B / 2 afterwards (else
SolverError). Soft margin: 0 <= a_i <= C gives |y^T a| < n C, so B = 2 n C is exact for every C. What
is approximate is only what is approximate in libsvm itself: its tolerance ``tol`` and its float32 kernel
cache (margins short of 1 by up to ~1e-2 on hard kernels); the estimator verifies the margins in float64.

**Time limit**: libsvm cannot be interrupted, and on non-separable data with a huge C its SMO runs for
~C iterations (alpha grows by O(1) per step). The fit therefore runs in a child process that is
terminated at ``time_limit``: started with "fork" on Linux (K reaches the child copy-on-write, no
copy), with "spawn" elsewhere (K is pickled to the child: one extra copy and ~1 s of start-up).
Results (support indices, dual coefficients, intercept, iterations) come back through a pipe.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import SVC

from lightning_afterkernel.errors import ConfigurationError, NotSeparableError, SolverError
from lightning_afterkernel.svm._checks import MAX_NORM_SQ, separation_bound, training_margins
from lightning_afterkernel.svm.protocol import DualResult

DEFAULT_TOL = 1e-3
"""libsvm's stopping tolerance (KKT violation) when ``tol=None``."""

MARGIN_TOL = 1e-2
"""Default accepted margin shortfall: libsvm's float32 kernel cache leaves margins up to ~1e-2 short."""

C_REL = 1e10
"""Box bound C times mean_i K_ii: far above any dual coefficient of a solvable hard margin."""

ABSORBER_REL = 1e9
"""Capacity B of the no-bias emulation (B = 1 / s^2) times mean_i K_ii; B / 2 < C."""

AT_BOUND_RTOL = 1e-6
"""alpha_i >= C (1 - AT_BOUND_RTOL) counts as at the box bound."""

MAX_MARGIN_CERTIFIED = MAX_NORM_SQ**-0.5
"""Alphas at the box bound mean "not separable" only when ``separation_bound`` on them is at most this (the
pre-check's and the interior-point method's limit, a geometric margin of ~3e-5 of the mean feature norm);
otherwise libsvm (float32 kernel cache) may have hit the bound on data separable with a small margin."""

START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
"""How the time-limited child process starts (see the module docstring)."""


def _cache_mb(n: int) -> float:
    """libsvm kernel cache: room for all of Q in float32, between 200 MB and 4 GB."""
    return float(min(max(200.0, 1.05 * 4.0 * n * n / 2**20 + 16.0), 4096.0))


def _libsvm_fit(
    K: np.ndarray, y: np.ndarray, C: float, tol: float, max_iter: int | None, sample_weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, float, int, bool, list[tuple[type[Warning], str]]]:
    """One ``SVC`` fit (per-example box C * sample_weight_i); returns (support, dual_coef, intercept, n_iter,
    converged, other warnings)."""
    svc = SVC(
        kernel="precomputed",
        C=C,
        tol=tol,
        max_iter=-1 if max_iter is None else max_iter,
        cache_size=_cache_mb(K.shape[0]),
        random_state=0,  # unused by a fit without probabilities, but None would draw a seed from NumPy's global RNG
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svc.fit(K, y, sample_weight=sample_weight)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    others = [(w.category, str(w.message)) for w in caught if not issubclass(w.category, ConvergenceWarning)]
    return svc.support_, svc.dual_coef_[0], float(svc.intercept_[0]), int(svc.n_iter_[0]), converged, others


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    # A forked child inherits the parent's handlers; Lightning's SIGTERM handler would swallow terminate()
    # (and, under DDP, run collectives from the child). The worker must die on SIGTERM.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        conn.send(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent as text
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_with_time_limit(
    fn: Callable[..., Any], args: tuple[Any, ...], time_limit: float | None, start_method: str | None = None
) -> Any:
    """Call ``fn(*args)`` in a child process and return its result, or raise ``TimeoutError``.

    ``time_limit=None`` calls it in this process. ``fn`` and its result must be picklable (and, with
    "spawn", ``args`` too). The child is terminated (SIGTERM, then SIGKILL) on timeout or interrupt.

    Raises:
        TimeoutError: no result within ``time_limit`` seconds.
        ConfigurationError: called with a time limit from a daemonic process.
        SolverError: the child raised (its traceback is in the message) or died.
    """
    if time_limit is None:
        return fn(*args)
    if multiprocessing.current_process().daemon:
        raise ConfigurationError(
            "time_limit needs a child process, which a daemonic process (e.g. a multiprocessing pool worker) "
            "cannot start; pass time_limit=None there."
        )
    ctx = multiprocessing.get_context(start_method or START_METHOD)
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, args), daemon=True)
    proc.start()
    sender.close()
    try:
        if not receiver.poll(time_limit):
            raise TimeoutError(f"no result within time_limit={time_limit:g} s")
        try:
            status, payload = receiver.recv()
            proc.join(1)  # the child closes its end and exits by itself once the result is sent
        except EOFError:
            proc.join(5)
            raise SolverError(
                f"the solver process died without a result (exit code {proc.exitcode}); it may have run out "
                "of memory. Free memory or use a smaller training set."
            ) from None
    finally:
        receiver.close()
        if proc.is_alive():
            proc.terminate()
            proc.join(2)
            if proc.is_alive():
                proc.kill()
        proc.join()
    if status == "error":
        raise SolverError(f"the solver raised in its worker process:\n{payload}")
    return payload


def no_bias_problem(K: np.ndarray, y_pm: np.ndarray, capacity: float) -> tuple[np.ndarray, np.ndarray]:
    """The augmented (n + 2) x (n + 2) kernel and labels of the no-bias emulation (see the module docstring).

    The two virtual examples have features +-u / sqrt(capacity), u orthogonal to every phi(x_i), and labels
    +1, -1: they absorb y^T a at no cost while |y^T a| < capacity. When K is the top-left corner of an
    (n + 2) x (n + 2) buffer (``check_and_normalize_kernel(..., pad=2)``) the buffer is completed in place;
    else K is copied.
    """
    n = K.shape[0]
    base = K.base
    if not (
        isinstance(base, np.ndarray)
        and base.shape == (n + 2, n + 2)
        and base.flags.c_contiguous
        and K.__array_interface__["data"][0] == base.__array_interface__["data"][0]
    ):
        base = np.empty((n + 2, n + 2))  # not np.zeros: calloc'd pages fault twice when K is written (2-10x slower)
        base[:n, :n] = K
    base[:n, n:] = 0.0
    base[n:, :n] = 0.0
    base[n:, n:] = np.array([[1.0, -1.0], [-1.0, 1.0]]) / capacity
    return base, np.concatenate([y_pm, [1.0, -1.0]])


def _solve(
    K: np.ndarray,
    y_pm: np.ndarray,
    C: float,
    fit_intercept: bool,
    capacity: float,
    tol: float,
    max_iter: int | None,
    time_limit: float | None,
) -> tuple[np.ndarray, float, int, bool]:
    """One libsvm solve with box 0 <= a <= C; without a bias through the augmented kernel of capacity B.

    The virtual examples get their own box max(C, B) (libsvm's per-example C_i = C * sample_weight_i), so
    they never bind as long as |y^T a| < B. Returns (alpha, libsvm's intercept, n_iter, converged).

    Raises:
        TimeoutError: no result within ``time_limit``.
    """
    n = K.shape[0]
    weights = None
    if fit_intercept:
        K_solve, y_solve = K, y_pm
    else:
        K_solve, y_solve = no_bias_problem(K, y_pm, capacity)
        if capacity > C:
            weights = np.concatenate([np.ones(n), [capacity / C, capacity / C]])
    support, dual_coef, intercept, n_iter, converged, others = run_with_time_limit(
        _libsvm_fit, (K_solve, y_solve, C, tol, max_iter, weights), time_limit
    )
    for category, message in others:
        warnings.warn(message, category, stacklevel=3)
    alpha_all = np.zeros(K_solve.shape[0])
    alpha_all[support] = dual_coef * y_solve[support]
    return alpha_all[:n], intercept, n_iter, converged


def check_available() -> None:
    """scikit-learn is a dependency: always available."""


def share_kernel(K: np.ndarray) -> None:
    """Nothing to share between problems on one K (libsvm caches kernel rows per fit)."""


def fit_dual(
    K: np.ndarray,
    y_pm: np.ndarray,
    fit_intercept: bool,
    tol: float,
    max_iter: int | None,
    time_limit: float | None,
    *,
    shared: None = None,
    check_unconverged: bool = True,
) -> DualResult:
    """Solve the hard-margin dual on a float64 kernel with libsvm (see the module docstring).

    Args:
        K: (n, n) symmetric float64 kernel, mean diagonal > 0.
        y_pm: (n,) labels in {-1.0, +1.0}.
        fit_intercept: solve with a bias b (y^T a = 0) or without (the emulation above).
        tol: libsvm's stopping tolerance on the KKT violation.
        max_iter: libsvm iteration limit (None: no limit).
        time_limit: seconds before the fit is abandoned (None: no limit, runs in this process).
        shared: ``share_kernel(K)`` (None: nothing to share).
        check_unconverged: apply the checks of ``finish_hard_margin`` (alphas at the box bound) also to a run
            stopped at ``max_iter``; False returns its alphas unchecked, with ``converged=False``, for a caller
            that hands such a run to another solver.

    Raises:
        NotSeparableError: alphas reached the box bound C and certify non-separability (``finish_hard_margin``).
        SolverError: time limit hit, the no-bias emulation saturated, or alphas at the box bound without a
            certificate.
    """
    C, capacity = hard_margin_bounds(K)
    try:
        alpha, _, n_iter, converged = _solve(K, y_pm, C, fit_intercept, capacity, tol, max_iter, time_limit)
    except TimeoutError:
        raise SolverError(
            f"libsvm hit the time limit (time_limit={time_limit:g} s) without a solution. The training data "
            "may not be separable by this kernel (then no hard-margin SVM exists and libsvm never finishes); "
            "if it is separable but hard, raise time_limit (None removes the limit)."
        ) from None
    if not converged and not check_unconverged:
        return DualResult(alpha=alpha, intercept=0.0, n_iter=n_iter, converged=False)
    return finish_hard_margin(K, y_pm, alpha, fit_intercept, C, capacity, n_iter, converged)


def hard_margin_bounds(K: np.ndarray) -> tuple[float, float]:
    """(box bound C, no-bias capacity B) of an SMO hard margin: ``C_REL`` and ``ABSORBER_REL`` / mean K_ii."""
    mean_diag = float(np.diagonal(K).mean())
    return C_REL / mean_diag, ABSORBER_REL / mean_diag


def finish_hard_margin(
    K: np.ndarray,
    y_pm: np.ndarray,
    alpha: np.ndarray,
    fit_intercept: bool,
    C: float,
    capacity: float,
    n_iter: int,
    converged: bool,
) -> DualResult:
    """Checks shared by the SMO backends, on the real examples' alphas of a hard-margin solve.

    With a bias, b is recomputed in float64 (``best_intercept``); without, the emulation must not have
    saturated (|y^T a| < capacity / 2, else SolverError). An alpha at the box bound C means that the data is not
    separable, or separable only with a tiny margin (an exact hard margin has 1^T a = ||w||^2, so its alphas stay
    below C unless ||w||^2 >= C, but libsvm's float32 kernel cache also drives the alphas of separable data with
    a margin of ~1e-4 to C). It is called not separable only when ``separation_bound`` on these alphas, in
    float64, is at most ``MAX_MARGIN_CERTIFIED``; otherwise the verdict is left open (SolverError).

    Raises:
        NotSeparableError: alphas at the box bound C that certify non-separability.
        SolverError: the no-bias emulation saturated, or alphas at the box bound without that certificate.
    """
    if fit_intercept:
        intercept = best_intercept(K, y_pm, alpha)
    else:
        intercept = 0.0
        y_dot_alpha = float(y_pm @ alpha)
        if abs(y_dot_alpha) >= 0.5 * capacity:
            raise SolverError(
                f"the no-bias emulation saturated: |y^T alpha| = {y_dot_alpha:.3g} is not below half its "
                f"capacity {capacity:.3g}, so the SMO's bias may not be 0. This kernel's no-bias hard margin is "
                "extremely small; use fit_intercept=True or backend='torch'."
            )
    at_bound = alpha >= C * (1.0 - AT_BOUND_RTOL)
    if at_bound.any():
        best = float(training_margins(K, y_pm, alpha, intercept).min())
        bound = separation_bound(K, y_pm, alpha, fit_intercept)
        if bound <= MAX_MARGIN_CERTIFIED:
            raise NotSeparableError(
                f"the training data is not separable by this kernel: {int(at_bound.sum())} alphas reached the box "
                f"bound C = {C:.3g}, and in float64 their combination bounds the geometric margin of every "
                f"separator by {bound:.2g} times the mean feature norm (best minimum training margin reached "
                f"{best:.3g}). A hard-margin SVM does not exist for these labels; check for mislabelled or "
                "duplicated examples, or use SoftMarginSVM.",
                best_margin=best,
            )
        raise SolverError(
            f"libsvm's alphas reached the box bound C = {C:.3g} ({int(at_bound.sum())} of them; best minimum "
            f"training margin {best:.3g}): the data is either not separable by this kernel or separable only with "
            f"a very small margin, which libsvm, with its float32 kernel cache, cannot tell apart. The float64 "
            f"bound from its alphas (geometric margin <= {bound:.2g} times the mean feature norm) does not settle "
            f"it either. Use backend='auto' or 'torch', whose exact interior-point method decides, or SoftMarginSVM."
        )
    return DualResult(alpha=alpha, intercept=intercept, n_iter=n_iter, converged=converged)


def fit_soft_dual(
    K: np.ndarray,
    y_pm: np.ndarray,
    C: float,
    fit_intercept: bool,
    tol: float,
    max_iter: int | None,
    time_limit: float | None,
) -> DualResult:
    """Solve the soft-margin dual (box 0 <= a <= C) on a float64 kernel with libsvm.

    Without a bias the emulation above is exact for every C: |y^T a| <= sum_i a_i < n C, so with capacity
    B = 2 n C (and the virtual examples' box B) it can never saturate. With a bias, libsvm's b is replaced
    by the nearest minimiser of the hinge loss for the returned alpha (``_hinge_intercept``).

    Args:
        K: (n, n) symmetric float64 kernel.
        y_pm: (n,) labels in {-1.0, +1.0}.
        C: the box bound (> 0), in K's scale.
        fit_intercept, tol, max_iter, time_limit: as in ``fit_dual``.

    Raises:
        SolverError: time limit hit.
    """
    try:
        alpha, intercept, n_iter, converged = _solve(
            K, y_pm, C, fit_intercept, 2.0 * K.shape[0] * C, tol, max_iter, time_limit
        )
    except TimeoutError:
        raise SolverError(
            f"libsvm hit the time limit (time_limit={time_limit:g} s) without a soft-margin solution; raise "
            "time_limit (None removes the limit) or use a smaller C (a huge C approaches the hard margin, which "
            "is slow on data that is not separable)."
        ) from None
    if fit_intercept:
        f = training_margins(K, y_pm, alpha, 0.0) * y_pm
        intercept = _hinge_intercept(f, y_pm, intercept)
    else:
        intercept = 0.0
    return DualResult(alpha=alpha, intercept=intercept, n_iter=n_iter, converged=converged)


def best_intercept(K: np.ndarray, y: np.ndarray, alpha: np.ndarray) -> float:
    """The b maximising min_i y_i (f_i + b) for fixed alpha, in float64.

    libsvm's own b comes from float32-cached gradients; for fixed w the best b balances the smallest
    positive-class and negative-class margins: b = (min_{y=-1} (-f_i) - min_{y=+1} f_i) / 2.
    """
    f = training_margins(K, y, alpha, 0.0) * y
    return 0.5 * (float(np.min(-f[y < 0])) - float(np.min(f[y > 0])))


def _hinge_intercept(f: np.ndarray, y: np.ndarray, b0: float) -> float:
    """The minimiser of h(b) = sum_i max(0, 1 - y_i (f_i + b)) nearest to b0, in float64.

    h is convex and piecewise linear with kinks at c_i = y_i - f_i; its right slope at b is
    #{y_i = -1, c_i <= b} - #{y_i = +1, c_i > b} and its left slope #{y_i = -1, c_i < b} - #{y_i = +1, c_i >= b}.
    The minimisers form [lo, hi]: lo the smallest kink with right slope >= 0, hi the largest with left
    slope <= 0 (both exist when both classes are present).
    """
    c = y - f
    c_pos, c_neg = np.sort(c[y > 0]), np.sort(c[y < 0])
    kinks = np.unique(c)
    right = np.searchsorted(c_neg, kinks, side="right") - (c_pos.size - np.searchsorted(c_pos, kinks, side="right"))
    left = np.searchsorted(c_neg, kinks, side="left") - (c_pos.size - np.searchsorted(c_pos, kinks, side="left"))
    lo = float(kinks[np.argmax(right >= 0)])
    hi = float(kinks[len(kinks) - 1 - np.argmax(left[::-1] <= 0)])
    return float(min(max(b0, lo), hi))
