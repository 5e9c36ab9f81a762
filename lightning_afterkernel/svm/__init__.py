"""Hard-margin SVMs on precomputed kernels: ``HardMarginSVM`` and one module per backend.

Every backend module exposes ``fit_dual(K, y_pm, fit_intercept, tol, max_iter, time_limit) -> DualResult``
on a validated float64 kernel; the estimator validates inputs, normalises, and verifies the solution.
"""

from lightning_afterkernel.svm._checks import DualResult, training_margins
from lightning_afterkernel.svm.estimator import HardMarginSVM, available_backends

__all__ = ["DualResult", "HardMarginSVM", "available_backends", "training_margins"]
