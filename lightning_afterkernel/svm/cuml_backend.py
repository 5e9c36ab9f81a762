"""cuML backend: RAPIDS cuML's GPU SMO, ``cuml.svm.SVC(kernel="precomputed")`` (cuML >= 26.02).

The same hard-margin set-up and checks as ``sklearn_backend``: C = ``C_REL`` / mean K_ii, the exact no-bias
emulation through two virtual examples (``no_bias_problem``), alphas at the box bound judged by
``finish_hard_margin`` (not separable only with a float64 certificate), b recomputed in float64, and the
estimator's float64 margin check afterwards. cuML checks neither symmetry nor positive semi-definiteness of a
precomputed kernel (the estimator does), and its ``nochange_steps`` rule may stop an SMO early on problems with
large alphas: the margin check catches that. The alphas are |dual coefficients|; cuML does not report its
iterations (``n_iter`` = 0).

Time limit: the fit runs in a separate Python process (``_smo_worker``; CUDA does not survive a fork), with K
passed through a temporary file; it pays cuML's import and CUDA start-up (a few seconds).
"""

from __future__ import annotations

import numpy as np

from lightning_afterkernel.errors import ConfigurationError, SolverError
from lightning_afterkernel.svm import _smo_worker
from lightning_afterkernel.svm.protocol import DualResult
from lightning_afterkernel.svm.sklearn_backend import finish_hard_margin, hard_margin_bounds, no_bias_problem

DEFAULT_TOL = 1e-3
"""cuML's stopping tolerance when ``tol=None`` (its default)."""

MARGIN_TOL = 1e-2
"""Default accepted margin shortfall (an SMO stopped at ``tol``)."""

MIN_VERSION = (26, 2)
"""First cuML release with ``SVC(kernel="precomputed")``."""


def check_available() -> None:
    """Raise ConfigurationError naming the fix when cuML >= 26.02 or a CUDA GPU is missing."""
    import torch

    try:
        import cuml
    except ImportError as err:
        raise ConfigurationError(
            "backend='cuml' needs RAPIDS cuML >= 26.02 on Linux with an NVIDIA GPU: pip install "
            f"'lightning-afterkernel[cuml]' (or 'cuml-cu12>=26.2'; see docs.rapids.ai/install) ({err}). "
            "Without a GPU use backend='auto'."
        ) from None
    version = tuple(int(part) for part in cuml.__version__.split(".")[:2])
    if version < MIN_VERSION:
        raise ConfigurationError(
            f"backend='cuml' needs cuML >= 26.02 for SVC(kernel='precomputed'); found {cuml.__version__}. "
            "Upgrade cuML, or use backend='auto'."
        )
    if not torch.cuda.is_available():
        raise ConfigurationError("backend='cuml' needs a CUDA GPU, and none is available; use backend='auto'.")


def share_kernel(K: np.ndarray) -> None:
    """Nothing to share between problems on one K (cuML receives K anew in each worker process)."""


def fit_dual(
    K: np.ndarray,
    y_pm: np.ndarray,
    fit_intercept: bool,
    tol: float,
    max_iter: int | None,
    time_limit: float | None,
    *,
    shared: None = None,
) -> DualResult:
    """Solve the hard-margin dual with cuML's GPU SMO on the precomputed kernel (``shared``: nothing to share).

    Raises:
        ConfigurationError: cuML >= 26.02 or a CUDA GPU is missing.
        NotSeparableError: alphas reached the box bound C and certify non-separability (``finish_hard_margin``).
        SolverError: time limit hit, the no-bias emulation saturated, or alphas at the box bound without a
            certificate.
    """
    check_available()
    n = K.shape[0]
    C, capacity = hard_margin_bounds(K)
    K_solve, y_solve = (K, y_pm) if fit_intercept else no_bias_problem(K, y_pm, capacity)
    try:
        support, coef = _smo_worker.run("cuml", K_solve, y_solve, C, tol, max_iter, time_limit)
    except RuntimeError as err:
        raise SolverError(str(err)) from None
    except TimeoutError:
        raise SolverError(
            f"cuML hit the time limit (time_limit={time_limit:g} s) without a solution; the data may not be "
            "separable (an SMO never finishes then): raise time_limit, or use backend='auto'."
        ) from None
    alpha = np.zeros(K_solve.shape[0])
    alpha[support] = coef
    return finish_hard_margin(K, y_pm, alpha[:n], fit_intercept, C, capacity, 0, True)
