"""thundersvm backend: thundersvm's SMO with its **linear** kernel on explicit features Phi, K = Phi Phi^T.

Never thundersvm's ``kernel="precomputed"``: its kernel code treats PRECOMPUTED as RBF and trains an RBF
kernel on the rows of K (upstream issue #66, open since 2018; test accuracy 0.6 where a true precomputed
SVM gets 0.996). Instead K is factored by an eigendecomposition K = V diag(lambda) V^T (``feature_factor``):
Phi = V_+ diag(sqrt(lambda_+)) over the eigenvalues above ``EIG_RTOL`` * lambda_max; eigenvalues below that
(round-off, or negative ones) are dropped and reported in ``DualResult.info``, with a warning when a
dropped negative eigenvalue is not negligible (below -``PSD_RTOL`` * lambda_max). The linear SVM on Phi has
w = Phi^T (a * y), so a test point's feature vector Phi_test = K_cross V_+ diag(1 / sqrt(lambda_+)) gives
f = Phi_test w + b = K_cross V_+ V_+^T (a * y) + b, which is the dual formula K_cross (a * y) + b used by
``HardMarginSVM.decision_function`` whenever the test kernel rows lie in the span of K's kept eigenvectors
(always for a kernel of features whose training Gram matrix is K, up to the dropped round-off).

Hard margin and no bias as in ``sklearn_backend``: C = ``C_REL`` / mean K_ii, and without a bias two virtual
examples +-e / sqrt(B) on a new feature coordinate absorb y^T a. The alphas are |dual coefficients| (thundersvm
orders the classes by first appearance); b is recomputed in float64. thundersvm does not report its
iterations (``n_iter`` = 0). The package is the optional extra ``thundersvm-cpu`` (0.3.3): the GPU wheel
``thundersvm`` 0.3.12 links CUDA 9 (libcusparse.so.9.0) and does not import on current systems.

Time limit: the fit runs in a separate Python process (``_smo_worker``; thundersvm's OpenMP hangs in a child
forked from a process whose OpenMP pool, e.g. torch's, is running), with Phi passed through a temporary file.
Cost: eigendecomposition O(n^3) (n = 2,000: ~2 s on 2 cores; once per kernel, ``share_kernel``, when one-vs-rest
solves several problems on it), then thundersvm's SMO on n x r features.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from lightning_afterkernel.errors import ConfigurationError, SolverError
from lightning_afterkernel.svm import _smo_worker
from lightning_afterkernel.svm._checks import PSD_RTOL
from lightning_afterkernel.svm.protocol import DualResult
from lightning_afterkernel.svm.sklearn_backend import finish_hard_margin, hard_margin_bounds

DEFAULT_TOL = 1e-3
"""thundersvm's stopping tolerance when ``tol=None`` (its default)."""

MARGIN_TOL = 1e-2
"""Default accepted margin shortfall (an SMO stopped at ``tol``; thundersvm keeps kernel values in float32)."""

EIG_RTOL = 1e-12
"""Eigenvalues below EIG_RTOL * lambda_max are dropped from the factor (float64 round-off of eigh is ~1e-15
of lambda_max times n)."""

INSTALL_HINT = (
    "pip install 'lightning-afterkernel[thundersvm]' (or pip install thundersvm-cpu); the GPU wheel 'thundersvm' "
    "0.3.12 needs CUDA 9 and does not import on current systems"
)


def check_available() -> None:
    """Raise ConfigurationError naming the fix when thundersvm cannot be imported."""
    try:
        import thundersvm  # noqa: F401
    except (ImportError, OSError) as err:
        raise ConfigurationError(
            f"backend='thundersvm' needs the thundersvm-cpu package: {INSTALL_HINT} ({err})."
        ) from None


def feature_factor(K: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Phi (n x r) with Phi Phi^T = K on its eigenvalues above ``EIG_RTOL`` * lambda_max, and a report.

    The report: ``feature_rank`` r, ``n_dropped_negative`` (eigenvalues below -EIG_RTOL * lambda_max) and
    ``min_eigenvalue_rel`` (lambda_min / lambda_max). Warns when a dropped negative eigenvalue is below
    -``PSD_RTOL`` * lambda_max (K is then clearly indefinite and the factor changes it).
    """
    lam_t, V_t = torch.linalg.eigh(torch.from_numpy(K))
    lam, V = lam_t.numpy(), V_t.numpy()
    lam_max = float(lam[-1])
    keep = lam > EIG_RTOL * lam_max
    n_neg = int(np.count_nonzero(lam < -EIG_RTOL * lam_max))
    min_rel = float(lam[0]) / lam_max
    if min_rel < -PSD_RTOL:
        warnings.warn(
            f"thundersvm backend: K has {n_neg} negative eigenvalues down to {min_rel:.2g} * lambda_max; the "
            "feature factor K = Phi Phi^T drops them, so the SVM is trained on a modified kernel. Recompute the "
            "kernel in float64 or check how it was built.",
            UserWarning,
            stacklevel=4,
        )
    phi = V[:, keep] * np.sqrt(lam[keep])
    return phi, {"feature_rank": float(phi.shape[1]), "n_dropped_negative": float(n_neg), "min_eigenvalue_rel": min_rel}


def share_kernel(K: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """The feature factor of K (``feature_factor``): one eigendecomposition for every problem on K."""
    return feature_factor(K)


def fit_dual(
    K: np.ndarray,
    y_pm: np.ndarray,
    fit_intercept: bool,
    tol: float,
    max_iter: int | None,
    time_limit: float | None,
    *,
    shared: tuple[np.ndarray, dict[str, float]] | None = None,
) -> DualResult:
    """Solve the hard-margin dual with thundersvm's linear kernel on a feature factor of K.

    ``shared``: ``share_kernel(K)``, the factor of this K; None computes it here.

    Raises:
        ConfigurationError: thundersvm is not installed.
        NotSeparableError: alphas reached the box bound C and certify non-separability (``finish_hard_margin``).
        SolverError: time limit hit, the no-bias emulation saturated, or alphas at the box bound without a
            certificate.
    """
    check_available()
    n = K.shape[0]
    C, capacity = hard_margin_bounds(K)
    phi, info = feature_factor(K) if shared is None else shared
    y_solve = y_pm
    if not fit_intercept:
        virtual = np.zeros((2, phi.shape[1] + 1))
        virtual[:, -1] = [1.0 / np.sqrt(capacity), -1.0 / np.sqrt(capacity)]
        phi = np.vstack([np.hstack([phi, np.zeros((n, 1))]), virtual])
        y_solve = np.concatenate([y_pm, [1.0, -1.0]])
    try:
        support, coef = _smo_worker.run("thundersvm", phi, y_solve, C, tol, max_iter, time_limit)
    except RuntimeError as err:
        raise SolverError(str(err)) from None
    except TimeoutError:
        raise SolverError(
            f"thundersvm hit the time limit (time_limit={time_limit:g} s) without a solution; the data may not be "
            "separable, or thundersvm is slow on this hard margin: raise time_limit or use backend='auto'."
        ) from None
    alpha = np.zeros(phi.shape[0])
    alpha[support] = coef
    result = finish_hard_margin(K, y_pm, alpha[:n], fit_intercept, C, capacity, 0, True)
    return DualResult(alpha=result.alpha, intercept=result.intercept, n_iter=0, info=dict(info))
