"""SVMs on precomputed kernels: ``HardMarginSVM``, its ``SoftMarginSVM`` fallback, one module per backend.

Every backend module exposes ``fit_dual(K, y_pm, fit_intercept, tol, max_iter, time_limit) -> DualResult``
(hard margin) on a validated float64 kernel; ``sklearn_backend`` also has ``fit_soft_dual`` (box C). The
estimators validate inputs, normalise, and verify the solution; ``lowrank`` certifies (non-)separability
of low-rank kernels before the hard-margin solve.
"""

from lightning_afterkernel.svm._checks import DualResult, training_margins
from lightning_afterkernel.svm.estimator import HardMarginSVM, SoftMarginSVM, available_backends

__all__ = ["DualResult", "HardMarginSVM", "SoftMarginSVM", "available_backends", "training_margins"]
