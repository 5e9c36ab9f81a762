"""auto backend: the fastest route that still returns a true hard margin (every training margin >= 1 - 1e-9).

- **CUDA device**: the interior-point method (``torch_backend``) on the whole problem.
- **CPU**: libsvm's SMO (``sklearn_backend``; very fast on easy kernels, but its float32 kernel cache leaves
  margins up to ~1e-2 short of 1, and it never finishes on non-separable data), then an exact polish:
  ``torch_backend.polish`` solves margins = 1 on libsvm's support set (one Cholesky of |S| x |S|, a few
  rounds of dropping negative alphas and adding violators). If that does not settle, the interior-point
  method runs on libsvm's support vectors plus every example with margin < 1 + ``WORKING_SLACK`` and adds
  violators until all n margins hold. libsvm gets iterations worth ``smo_budget(n)`` seconds (at most
  ``SMO_TIME_SHARE`` of ``time_limit``); past them (a hard or non-separable kernel) the interior-point method
  solves the whole problem, and detects non-separability. So does it when libsvm's alphas reach the box bound
  without certifying non-separability (``sklearn_backend.finish_hard_margin``): that happens on data separable
  only with a small margin, which libsvm's float32 kernel cache cannot resolve.

libsvm cannot be interrupted, so its budget is an iteration cap: the budget over the modelled cost of one SMO
iteration, ``SMO_NS_PER_ITER`` plus ``SMO_NS_PER_ITER_EXAMPLE`` per example (it reads two kernel rows; measured
on the 2-core reference CPU: 75-110 ns plus 1.7-4.8 ns per example; easy kernels need 0.5-1.5 n iterations, far
below the cap). libsvm runs in this process: no child process to start (a fork plus its exit cost 0.02-0.05 s,
more than libsvm itself on an easy kernel at n = 2,000 and 13% of it on the VGG's initial kernel at n = 11,982),
and the route does not depend on the machine's load. The price: the budget holds on the reference CPU (the
model overestimates the cost there, up to 1.4x at n = 2,000); a machine slower or busier than that overruns it,
and so the share of ``time_limit``, by its factor before the interior-point method takes over, as the
interior-point method itself can overrun ``time_limit`` by up to one iteration.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lightning_afterkernel.errors import NotSeparableError, SolverError
from lightning_afterkernel.svm import sklearn_backend, torch_backend
from lightning_afterkernel.svm._checks import training_margins
from lightning_afterkernel.svm.protocol import DualResult
from lightning_afterkernel.svm.torch_backend import resolve_device

DEFAULT_TOL = torch_backend.DEFAULT_TOL
"""The interior-point method's default tolerance (libsvm always runs at ``SMO_TOL``)."""

MARGIN_TOL = torch_backend.MARGIN_TOL
"""Default accepted margin shortfall: the route is exact."""

SMO_TOL = 1e-3
"""libsvm's tolerance in the first stage (its default); the polish makes the result exact."""

IPM_SECONDS_PER_GFLOP = 0.75
"""libsvm's budget (``smo_budget``) is about the interior-point method's own time for the whole problem, this
times n^3 / 3e9 (~15 iterations at 20 GFLOP/s; measured 10-13 ms at n = 300, 0.19-0.43 s at n = 1,000 on the
reference CPU), so that a kernel libsvm cannot solve costs at most ~2x the interior-point method; ..."""

SMO_SECONDS = 2.0
"""... but at most this many seconds (reached at n = 2,000), ..."""

SMO_SECONDS_PER_GFLOP = 0.15
"""... and at least this times n^3 / 3e9 (about 3 interior-point iterations; 6 s at n = 5,000, 86 s at 12,000), ..."""

SMO_MIN_SECONDS = 0.01
"""... and at least this (tiny n: about the interior-point method's fixed cost). n = 300: 0.01 s, 500: 0.03 s,
1,000: 0.25 s, 2,000-3,400: 2 s."""

SMO_TIME_SHARE = 0.5
"""libsvm gets at most this share of ``time_limit``, so that the interior-point method has time to decide."""

SMO_NS_PER_ITER = 100.0
"""Fixed nanoseconds per libsvm iteration assumed in the iteration cap (measured 75-110 on the reference CPU;
dominant below n ~ 30) ..."""

SMO_NS_PER_ITER_EXAMPLE = 5.0
"""... plus nanoseconds per iteration and training example (measured 1.7-4.8 on the reference CPU; a slower or
busier machine overruns the budget by its own factor)."""

WORKING_SLACK = 0.05
"""The interior-point fallback starts on libsvm's support vectors and the examples with margin < 1 + this."""


def smo_budget(n: int) -> float:
    """Seconds libsvm may take before the interior-point method takes over (without ``time_limit``): at most
    about the interior-point method's own time (capped at ``SMO_SECONDS``), at least a few of its iterations."""
    gflop = n**3 / 3e9
    return max(SMO_MIN_SECONDS, min(SMO_SECONDS, IPM_SECONDS_PER_GFLOP * gflop), SMO_SECONDS_PER_GFLOP * gflop)


def smo_iterations(seconds: float, n: int) -> int:
    """libsvm's iteration cap for a budget of ``seconds`` at n examples (the cost model above)."""
    return max(1, int(seconds / ((SMO_NS_PER_ITER + SMO_NS_PER_ITER_EXAMPLE * n) * 1e-9)))


def check_available() -> None:
    """scikit-learn and torch are dependencies: always available."""


def share_kernel(K: np.ndarray) -> None:
    """Nothing to share between problems on one K (neither libsvm nor the interior-point method has any)."""


def fit_dual(
    K: np.ndarray,
    y_pm: np.ndarray,
    fit_intercept: bool,
    tol: float,
    max_iter: int | None,
    time_limit: float | None,
    *,
    shared: None = None,
    device: torch.device | str | None = None,
    shrinking: bool = True,
) -> DualResult:
    """Solve the hard-margin dual exactly by the fastest route (see the module docstring).

    ``tol``, ``max_iter``, ``shrinking`` and ``device`` go to the interior-point method; libsvm uses ``SMO_TOL``;
    ``shared``: ``share_kernel(K)`` (None: nothing to share).
    ``n_iter`` of the result counts libsvm's iterations plus the polish's solves or the interior-point
    iterations; ``backend`` names the route ("torch", "sklearn+polish" or "sklearn+torch").

    Raises:
        NotSeparableError: libsvm's alphas reached the box bound and certify it (``finish_hard_margin``), or the
            interior-point certificate.
        SolverError: time or iteration limit.
    """
    start = time.perf_counter()
    dev = resolve_device(device)
    ipm = {"device": dev, "shrinking": shrinking}
    if dev.type == "cuda":
        result = torch_backend.fit_dual(K, y_pm, fit_intercept, tol, max_iter, time_limit, **ipm)
        return _relabel(result, 0, "torch")
    n = y_pm.size
    budget = smo_budget(n) if time_limit is None else min(SMO_TIME_SHARE * time_limit, smo_budget(n))
    try:
        smo = sklearn_backend.fit_dual(
            K, y_pm, fit_intercept, SMO_TOL, smo_iterations(budget, n), None, check_unconverged=False
        )
    except NotSeparableError:  # alphas at the box bound with a float64 certificate
        raise
    except SolverError:  # the no-bias emulation saturated, or alphas at the bound without a certificate
        smo = None  # the interior-point method decides
    if smo is not None and not smo.converged:  # stopped at the iteration cap (unchecked): as a time-out
        smo = None
    left = None if time_limit is None else max(time_limit - (time.perf_counter() - start), 1e-3)
    if smo is None:
        result = torch_backend.fit_dual(K, y_pm, fit_intercept, tol, max_iter, left, **ipm)
        return _relabel(result, 0, "torch")
    support = np.flatnonzero(smo.alpha > 0)
    polished = torch_backend.polish(K, y_pm, fit_intercept, support, device=dev)
    if polished is not None:
        return _relabel(polished, smo.n_iter, "sklearn+polish")
    margins = training_margins(K, y_pm, smo.alpha, smo.intercept)
    working = np.union1d(support, np.flatnonzero(margins < 1.0 + WORKING_SLACK))
    result = torch_backend.fit_dual(K, y_pm, fit_intercept, tol, max_iter, left, working_set=working, **ipm)
    return _relabel(result, smo.n_iter, "sklearn+torch")


def _relabel(result: DualResult, smo_iter: int, route: str) -> DualResult:
    return DualResult(
        alpha=result.alpha,
        intercept=result.intercept,
        n_iter=smo_iter + result.n_iter,
        converged=result.converged,
        backend=route,
        info=result.info,
        margins=result.margins,
    )
