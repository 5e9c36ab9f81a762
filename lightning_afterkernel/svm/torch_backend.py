"""torch backend: a dense primal-dual interior-point method (Mehrotra predictor-corrector) in float64.

It solves the hard-margin dual as the convex QP

    min_a 1/2 a^T Q a - 1^T a   s.t.  a >= 0   (and y^T a = 0 with a bias),   Q = diag(y) K diag(y),

whose KKT conditions are Q a + b y - 1 = s >= 0 (s_i = m_i - 1, m_i = y_i (f(x_i) + b) the functional
margin), a >= 0, a_i s_i = 0 and y^T a = 0. Each iteration linearises them around (a, s, b) > 0 with the
complementarity target sigma mu; with D = diag(s / a) the Newton system reduces to

    (Q + D) da + y db = r   <=>   (K + D)(y * da) = y * r - db 1,   y^T da = -y^T a,

i.e. **one float64 Cholesky of K + D per iteration** (Q + D = Y (K + D) Y) and two or three triangular
solves (predictor, corrector, and K + D against 1 for the bias). The start is a = s = 1, b = 0 (scaled
starts were slower on the MNIST kernels). Steps go a fraction max(0.99, 1 - mu) of the way to the boundary
of a, s > 0. A failed Cholesky (K numerically singular on the support vectors) is retried with
K + D + delta I, delta growing from ``REG_START`` of mean K_ii.

Stopping: max_i |r_i| <= ``FEAS_TOL`` (so every margin of the active set is >= 1 - FEAS_TOL), |y^T a| <=
``FEAS_TOL`` sum a, and a^T s <= ``tol`` * 1^T a / 2 (the relative duality gap; 1^T a / 2 is the
objective at the optimum). Then every example's margin is computed in float64 (one n x n product);
examples outside the active set with margin below 1 - ``FEAS_TOL`` are put back (see shrinking) and the
iterations go on. Finally the support set {a_i >= s_i} goes to ``polish`` (a crossover): margins exactly 1
on it by one Cholesky, a_i = 0 exactly elsewhere; if that does not verify, the interior solution is returned.

**Non-separable data** makes the QP unbounded: a grows without limit along a direction u >= 0 with
sum_i u_i y_i phi(x_i) = 0. Every iterate gives a bound: with u = a / 1^T a (with a bias: each class's
part scaled to total 1/2), every separator y_i (w . phi(x_i) + b) >= 1 has 1 <= w . sum_i u_i y_i phi(x_i)
<= ||w|| sqrt(q), q = z^T K z, z = u * y, so its geometric margin 1 / ||w|| is at most sqrt(q). q costs
nothing extra (K z comes with the residual), and ``NotSeparableError`` is raised once q <= mean K_ii /
``MAX_NORM_SQ`` (the pre-check's limit: a margin below ~3e-5 of the mean feature norm). On non-separable
kernels a diverges and q falls by orders of magnitude per iteration: detected in 9-12 iterations (overlapping
Gaussians and opposite-label duplicates, n = 600-2,000). ``best_margin`` of the error is the best geometric
margin min_i m_i / ||w|| (mean feature norm 1) over the iterates, on the examples in the system.

**Shrinking** (``shrinking=True``): an example whose slack s_i is large while its a_i is small (s_i >=
``SHRINK_SLACK``, a_i <= ``SHRINK_RATIO`` * s_i) once the residual is below ``SHRINK_RESIDUAL`` is clearly not
a support vector; it is dropped (a_i = 0) and the system shrinks to the remaining m examples (cost m^3 / 3 per
iteration instead of n^3 / 3). Dropped examples whose margin is violated at convergence come back. The same
mechanism solves on a given ``working_set`` (e.g. scikit-learn's support vectors) and adds violators until
every example has margin >= 1 - ``FEAS_TOL``.

Cost: time ~ iterations x (m^3 / 3 + 3 m^2) flops; memory: K plus one m x m factor, float64 on ``device``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lightning_afterkernel.errors import ConfigurationError, NotSeparableError, SolverError
from lightning_afterkernel.svm._checks import MAX_NORM_SQ, DualResult

DEFAULT_TOL = 1e-9
"""Default relative duality gap a^T s / (1^T a / 2) at which the IPM stops (the estimator's ``tol=None``)."""

MARGIN_TOL = 1e-6
"""Default accepted margin shortfall of the estimator's check (the IPM itself stops at ``FEAS_TOL``)."""

FEAS_TOL = 1e-9
"""Largest accepted |Q a + b y - 1 - s|_inf and |y^T a| / 1^T a: margins come out >= 1 - FEAS_TOL."""

MAX_ITER = 200
"""Iteration limit when ``max_iter=None`` (separable problems need 10-30, non-separable ones are detected
within ~15)."""

SHRINK_RESIDUAL = 0.25
"""Shrinking starts once max_i |r_i| <= SHRINK_RESIDUAL (margins m_i = 1 + s_i + r_i are then roughly known) ..."""

SHRINK_SLACK = 0.25
"""... and drops the examples with slack s_i >= SHRINK_SLACK ..."""

SHRINK_RATIO = 0.1
"""... and a_i <= SHRINK_RATIO * s_i (on the central path a_i = mu / s_i: far from being a support vector).
On the MNIST after kernel (n = 2,000) this dropped ~75% of the examples three iterations before convergence,
none of them a support vector."""

SUPPORT_ROWS = 128
"""Rows of K per product in ``sparse_product``: small enough that the gathered rows reuse the allocator's memory."""

POLISH_ROUNDS = 8
"""Linear solves ``polish`` tries before handing over to the interior-point method."""

REG_START = 1e-12
"""First regularisation delta / mean K_ii of a failed Cholesky; multiplied by 100 per retry, up to 1e-4."""


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` -> CPU; otherwise a valid torch device (CUDA must be available for "cuda")."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigurationError(
            f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {err}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"device={device!r} needs CUDA, which is not available here; use device='cpu'.")
    return dev


def _step_to_boundary(x: torch.Tensor, dx: torch.Tensor) -> float:
    """Largest t <= 1 with x + t dx >= 0."""
    neg = dx < 0
    if not bool(neg.any()):
        return 1.0
    return min(1.0, float((-x[neg] / dx[neg]).min()))


class _Factor:
    """Cholesky factor of K_active + diag(d), regularised on failure."""

    def __init__(self, K_act: torch.Tensor, d: torch.Tensor, mean_diag: float) -> None:
        delta = 0.0
        while True:
            M = K_act.clone()
            M.diagonal().add_(d + delta)
            L, info = torch.linalg.cholesky_ex(M)
            if int(info) == 0:
                self.L, self.delta = L, delta
                return
            delta = REG_START * mean_diag if delta == 0.0 else 100.0 * delta
            if delta > 1e-4 * mean_diag:
                raise SolverError(
                    "the interior-point method could not factor K + D even with a regularisation of 1e-4 mean K_ii: "
                    "K is far from positive semi-definite. Recompute the kernel in float64 or check how it was built."
                )

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(rhs, self.L)


def fit_dual(
    K: np.ndarray,
    y_pm: np.ndarray,
    fit_intercept: bool,
    tol: float,
    max_iter: int | None,
    time_limit: float | None,
    *,
    device: torch.device | str | None = None,
    shrinking: bool = True,
    working_set: np.ndarray | None = None,
) -> DualResult:
    """Solve the hard-margin dual with the interior-point method above.

    Args:
        K: (n, n) symmetric float64 kernel (numpy; shared, not copied, on the CPU).
        y_pm: (n,) labels in {-1.0, +1.0}.
        fit_intercept: with a bias b (y^T a = 0) or without.
        tol: relative duality gap a^T s / (1^T a / 2) to stop at (e.g. ``DEFAULT_TOL``).
        max_iter: iteration limit (None: ``MAX_ITER``).
        time_limit: seconds before SolverError (None: no limit); checked once per iteration.
        device: torch device of the computation (None: CPU).
        shrinking: drop clearly non-support examples from the system (see the module docstring).
        working_set: start on these example indices only; violators elsewhere are added until all margins hold.

    Raises:
        NotSeparableError: the iterates certify that every separator has a geometric margin below
            sqrt(mean K_ii / MAX_NORM_SQ); ``best_margin`` is the best geometric margin reached.
        SolverError: iteration or time limit, or an unfactorable K + D.
    """
    start = time.perf_counter()
    dev = resolve_device(device)
    Kt = torch.as_tensor(K, dtype=torch.float64, device=dev)
    y = torch.as_tensor(y_pm, dtype=torch.float64, device=dev)
    n = y.numel()
    gap_tol = float(tol)
    limit = MAX_ITER if max_iter is None else int(max_iter)
    mean_diag = float(Kt.diagonal().mean())
    q_min = mean_diag / MAX_NORM_SQ

    active = torch.ones(n, dtype=torch.bool, device=dev)
    if working_set is not None:
        active[:] = False
        active[torch.as_tensor(working_set, device=dev)] = True
        for label in (1.0, -1.0):  # both classes, or y^T a = 0 and the certificate break down
            if not bool((active & (y == label)).any()):
                active[int(torch.nonzero(y == label)[0])] = True
    idx, K_act = _restrict(Kt, active)
    a = torch.where(active, 1.0, 0.0).to(torch.float64)
    s = torch.ones(n, dtype=torch.float64, device=dev)
    b = 0.0
    best_margin = -np.inf
    it = 0
    while True:
        if time_limit is not None and time.perf_counter() - start > time_limit:
            raise SolverError(
                f"the interior-point method hit the time limit (time_limit={time_limit:g} s) after {it} "
                "iterations; raise time_limit (None removes it) or use a GPU (device='cuda')."
            )
        y_i, a_i, s_i = y[idx], a[idx], s[idx]
        ya = y_i * a_i
        pos = y_i > 0
        if fit_intercept:
            F = K_act @ torch.stack([torch.where(pos, ya, 0.0), torch.where(pos, 0.0, ya)], dim=1)
            f = F[:, 0] + F[:, 1]
        else:
            f = K_act @ ya
        margins = y_i * (f + b)
        w_sq = float(ya @ f)
        sum_a = float(a_i.sum())
        # Separability certificate: q = z^T K z for the normalised iterate z (see the module docstring).
        if fit_intercept:
            c_pos, c_neg = 0.5 / float(a_i[pos].sum()), 0.5 / float(a_i[~pos].sum())
            q = (
                c_pos**2 * float(ya[pos] @ F[pos, 0])
                + 2.0 * c_pos * c_neg * float(ya[pos] @ F[pos, 1])
                + c_neg**2 * float(ya[~pos] @ F[~pos, 1])
            )
        else:
            q = w_sq / sum_a**2
        if w_sq > 0.0:
            best_margin = max(best_margin, float(margins.min()) / np.sqrt(w_sq))
        if q <= q_min:
            raise NotSeparableError(
                f"the training data is not separable by this kernel: after {it} interior-point iterations the dual "
                f"variables diverge along a combination of examples whose signed features sum to (numerically) "
                f"zero, so every separator has a geometric margin <= {np.sqrt(max(q, 0.0) / mean_diag):.1e} times "
                f"the mean feature norm (best geometric margin reached: {best_margin:.3g}). A hard-margin SVM does "
                "not exist; check for mislabelled or duplicated examples, or use SoftMarginSVM.",
                best_margin=float(best_margin) if np.isfinite(best_margin) else None,
            )
        r = margins - 1.0 - s_i
        r_max = float(r.abs().max())
        gap = float(a_i @ s_i)
        r_p = float(y_i @ a_i) if fit_intercept else 0.0
        if r_max <= FEAS_TOL and abs(r_p) <= FEAS_TOL * sum_a and gap <= gap_tol * 0.5 * sum_a:
            all_margins = y * (sparse_product(Kt, idx, (y * a)[idx]) + b) if idx.numel() < n else None  # a = 0 off it
            violators = None if all_margins is None else (~active) & (all_margins < 1.0 - FEAS_TOL)
            if violators is None or not bool(violators.any()):
                info = {"n_active": float(idx.numel())}
                exact = _polish(Kt, y, fit_intercept, a >= s, POLISH_ROUNDS)  # a_i >= s_i: the support vectors
                if exact is not None:
                    alpha, b_exact, _, margins = exact
                    return DualResult(
                        alpha=alpha.cpu().numpy(),
                        intercept=b_exact,
                        n_iter=it,
                        info=info,
                        margins=margins.cpu().numpy(),
                    )
                return DualResult(alpha=a.cpu().numpy(), intercept=float(b), n_iter=it, info=info)
            _grow(active, violators, a, s, all_margins, gap / idx.numel())
            idx, K_act = _restrict(Kt, active)
            continue
        if shrinking and r_max <= SHRINK_RESIDUAL:
            drop = (s_i >= SHRINK_SLACK) & (a_i <= SHRINK_RATIO * s_i)
            if bool(drop.any()) and bool((~drop & pos).any()) and bool((~drop & ~pos).any()):
                a[idx[drop]] = 0.0
                active[idx[drop]] = False
                keep = torch.nonzero(~drop).squeeze(1)
                idx, K_act = idx[keep], K_act[keep[:, None], keep]
                continue
        if it == limit:
            raise SolverError(
                f"the interior-point method did not converge in max_iter={limit} iterations; raise max_iter "
                f"(best geometric margin reached: {best_margin:.3g}; slow convergence may mean the data is only "
                "barely separable)."
            )
        da, ds, db = _mehrotra_direction(K_act, y_i, a_i, s_i, r, r_p, fit_intercept, mean_diag)
        step = min(_step_to_boundary(a_i, da), _step_to_boundary(s_i, ds))
        step = min(1.0, max(0.99, 1.0 - gap / idx.numel()) * step)
        a[idx] = a_i + step * da
        s[idx] = s_i + step * ds
        b += step * db
        it += 1


def _restrict(Kt: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the active examples, K restricted to them; K itself when all are active)."""
    idx = torch.nonzero(active).squeeze(1)
    return idx, Kt if idx.numel() == Kt.shape[0] else Kt[idx[:, None], idx]


def _grow(
    active: torch.Tensor, violators: torch.Tensor, a: torch.Tensor, s: torch.Tensor, margins: torch.Tensor, mu: float
) -> None:
    """Put margin violators back into the active set, centred (a_i s_i = mu), in place."""
    active |= violators
    mu = max(mu, FEAS_TOL)
    slack = (margins[violators] - 1.0).clamp_min(0.0) + mu**0.5
    s[violators] = slack
    a[violators] = mu / slack


def _mehrotra_direction(
    K_act: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    r: torch.Tensor,
    r_p: float,
    fit_intercept: bool,
    mean_diag: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Predictor-corrector direction (da, ds, db) for residual r = Q a + b y - 1 - s and r_p = y^T a."""
    m = a.numel()
    factor = _Factor(K_act, s / a, mean_diag)
    ones = torch.ones(m, 1, dtype=a.dtype, device=a.device)
    v = factor.solve(ones).squeeze(1) if fit_intercept else None

    def solve(r_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        rhs = -r + r_c / a
        u = factor.solve((y * rhs).unsqueeze(1)).squeeze(1)
        db = float((u.sum() + r_p) / v.sum()) if fit_intercept else 0.0
        da = y * (u - db * v) if fit_intercept else y * u
        ds = (r_c - s * da) / a
        return da, ds, db

    mu = float(a @ s) / m
    da_aff, ds_aff, db_aff = solve(-a * s)
    step_a = _step_to_boundary(a, da_aff)
    step_s = _step_to_boundary(s, ds_aff)
    step = min(step_a, step_s)
    mu_aff = float((a + step * da_aff) @ (s + step * ds_aff)) / m
    sigma = (mu_aff / mu) ** 3
    return solve(-a * s - da_aff * ds_aff + sigma * mu)


def sparse_product(Kt: torch.Tensor, idx: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """K v for v zero outside ``idx`` (v[idx] = c), with K symmetric: sum over i in idx of c_i K[i, :].

    Reads only the |idx| rows of K, ``SUPPORT_ROWS`` at a time, instead of all n^2 entries: on 2 CPU cores
    0.36 ms instead of 1.7 ms (n = 2,000, 343 rows), 6.6 instead of 50 (n = 11,982, 1,067 rows). At |idx| >= n / 4
    (or on a GPU, where the full product is cheap) it is the ordinary product."""
    n = Kt.shape[0]
    if Kt.device.type != "cpu" or 4 * idx.numel() >= n:
        v = Kt.new_zeros(n)
        v[idx] = c
        return Kt @ v
    out = Kt.new_zeros(n)
    for start in range(0, idx.numel(), SUPPORT_ROWS):
        out.addmv_(Kt[idx[start : start + SUPPORT_ROWS]].T, c[start : start + SUPPORT_ROWS])
    return out


def polish(
    K: np.ndarray,
    y_pm: np.ndarray,
    fit_intercept: bool,
    support: np.ndarray,
    *,
    device: torch.device | str | None = None,
    rounds: int = POLISH_ROUNDS,
) -> DualResult | None:
    """The exact hard-margin solution from a guess of its support set S (e.g. scikit-learn's), or None.

    On S the margins are exactly 1: K_SS c + b 1 = y_S with c = a_S * y_S (and 1^T c = 0 with a bias), one
    Cholesky of K_SS plus one step of iterative refinement. If some a_i < 0 they leave S; if an example
    outside S has margin < 1 - ``FEAS_TOL`` it joins S; then solve again. When neither happens the KKT
    conditions hold exactly (a >= 0, margins >= 1, margin 1 wherever a > 0): the optimum. Gives up (None) after
    ``rounds`` solves or if K_SS is not numerically positive definite; the interior-point method takes over.
    Cost per round: |S|^3 / 3 flops plus one n x |S| product.
    """
    dev = resolve_device(device)
    Kt = torch.as_tensor(K, dtype=torch.float64, device=dev)
    y = torch.as_tensor(y_pm, dtype=torch.float64, device=dev)
    in_s = torch.zeros(y.numel(), dtype=torch.bool, device=dev)
    in_s[torch.as_tensor(support, device=dev)] = True
    exact = _polish(Kt, y, fit_intercept, in_s, rounds)
    if exact is None:
        return None
    alpha, b, solves, margins = exact
    return DualResult(alpha=alpha.cpu().numpy(), intercept=b, n_iter=solves, margins=margins.cpu().numpy())


def _polish(
    Kt: torch.Tensor, y: torch.Tensor, fit_intercept: bool, in_s: torch.Tensor, rounds: int
) -> tuple[torch.Tensor, float, int, torch.Tensor] | None:
    """``polish`` on tensors: (alpha, b, number of solves, margins) or None; ``in_s`` (the guess of S) is modified."""
    for round_ in range(1, rounds + 1):
        idx = torch.nonzero(in_s).squeeze(1)
        y_s = y[idx]
        if fit_intercept and not (bool((y_s > 0).any()) and bool((y_s < 0).any())):
            return None
        K_ss = Kt[idx[:, None], idx]
        L, info = torch.linalg.cholesky_ex(K_ss)
        if int(info) != 0:
            return None
        rhs = torch.stack([y_s, torch.ones_like(y_s)], dim=1) if fit_intercept else y_s.unsqueeze(1)
        sol = torch.cholesky_solve(rhs, L)
        sol = sol + torch.cholesky_solve(rhs - K_ss @ sol, L)  # one step of iterative refinement
        if fit_intercept:
            b = float(sol[:, 0].sum() / sol[:, 1].sum())
            c = sol[:, 0] - b * sol[:, 1]
        else:
            b, c = 0.0, sol[:, 0]
        a_s = y_s * c
        if bool((a_s < 0).any()):
            in_s[idx[a_s < 0]] = False
            if not bool(in_s.any()):
                return None
            continue
        margins = y * (sparse_product(Kt, idx, c) + b)
        violators = margins < 1.0 - FEAS_TOL
        if not bool(violators.any()):
            alpha = torch.zeros_like(y)
            alpha[idx] = a_s
            return alpha, b, round_, margins
        if bool((violators & in_s).any()):
            return None  # the solve itself is inaccurate (K_SS ill-conditioned): leave it to the IPM
        in_s |= violators
    return None
