"""SVMs on precomputed kernels: ``HardMarginSVM``, its ``SoftMarginSVM`` fallback, one module per backend.

Two classes give one binary SVM; k > 2 classes give k one-vs-rest SVMs on the same kernel (``estimators_``).
Every hard-margin backend module conforms to ``protocol.HardMarginBackend``: ``fit_dual(K, y_pm, fit_intercept,
tol, max_iter, time_limit, *, shared=None) -> DualResult`` on a validated, normalised float64 kernel,
``share_kernel(K)`` (work on K reused by the problems of a one-vs-rest fit), ``check_available()``,
``DEFAULT_TOL`` and ``MARGIN_TOL``: ``torch_backend`` (interior-point method, any torch device; with
``auto_backend`` also a ``DeviceBackend``), ``auto_backend`` (the fastest exact route), ``sklearn_backend`` (libsvm;
also ``fit_soft_dual``, box C), ``cuml_backend`` and ``thundersvm_backend`` (optional packages). The estimators
validate inputs, normalise, and verify the solution; ``lowrank`` certifies (non-)separability of low-rank kernels
before the hard-margin solve.
"""

from lightning_afterkernel.svm._checks import training_margins
from lightning_afterkernel.svm.estimator import HardMarginSVM, SoftMarginSVM
from lightning_afterkernel.svm.protocol import DeviceBackend, DualResult, HardMarginBackend, available_backends

__all__ = [
    "DeviceBackend",
    "DualResult",
    "HardMarginBackend",
    "HardMarginSVM",
    "SoftMarginSVM",
    "available_backends",
    "training_margins",
]
