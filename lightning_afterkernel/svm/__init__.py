"""SVMs on precomputed kernels: ``HardMarginSVM``, its ``SoftMarginSVM`` fallback, one module per backend.

Every backend module exposes ``fit_dual(K, y_pm, fit_intercept, tol, max_iter, time_limit, **options) ->
DualResult`` (hard margin) on a validated, normalised float64 kernel, plus ``DEFAULT_TOL`` and ``MARGIN_TOL``:
``torch_backend`` (interior-point method, any torch device), ``auto_backend`` (the fastest exact route),
``sklearn_backend`` (libsvm; also ``fit_soft_dual``, box C), ``cuml_backend`` and ``thundersvm_backend``
(optional packages, with ``check_available``). The estimators validate inputs, normalise, and verify the
solution; ``lowrank`` certifies (non-)separability of low-rank kernels before the hard-margin solve.
"""

from lightning_afterkernel.svm._checks import DualResult, training_margins
from lightning_afterkernel.svm.estimator import HardMarginSVM, SoftMarginSVM, available_backends

__all__ = ["DualResult", "HardMarginSVM", "SoftMarginSVM", "available_backends", "training_margins"]
