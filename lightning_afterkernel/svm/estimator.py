"""``HardMarginSVM``: a hard-margin SVM on a precomputed kernel, scikit-learn style."""

from __future__ import annotations

import importlib
import math
import sys
import time
from numbers import Integral, Real
from types import ModuleType
from typing import TYPE_CHECKING, Self

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from lightning_afterkernel.errors import ConfigurationError, DataError, SolverError
from lightning_afterkernel.svm._checks import (
    DualResult,
    check_cross_kernel,
    check_kernel,
    check_labels,
    check_separable_precheck,
    warn_if_indefinite,
)

if TYPE_CHECKING:
    from sklearn.utils import Tags

_BACKENDS = {"sklearn": "lightning_afterkernel.svm.sklearn_backend"}
_AUTO_ORDER = ("sklearn",)
_PLANNED = ("torch", "cuml", "thundersvm")


def available_backends() -> tuple[str, ...]:
    """Names accepted by ``HardMarginSVM(backend=...)``."""
    return ("auto", *_BACKENDS)


def _resolve_backend(name: object) -> tuple[str, ModuleType]:
    """Map a backend name to (chosen name, module exposing ``fit_dual``)."""
    valid = ", ".join(repr(b) for b in available_backends())
    if name in _PLANNED:
        raise ConfigurationError(f"backend={name!r} is not available yet; valid backends: {valid}.")
    if name == "auto":
        name = _AUTO_ORDER[0]
    if name not in _BACKENDS:
        raise ConfigurationError(f"unknown backend={name!r}; valid backends: {valid}.")
    return name, importlib.import_module(_BACKENDS[name])


class HardMarginSVM(ClassifierMixin, BaseEstimator):
    """Hard-margin binary SVM on a precomputed kernel (by default without a bias, as in the paper).

    Solves, with Q = diag(y) K diag(y) and y in {-1, +1},

        max_a  1^T a - 1/2 a^T Q a   s.t.  a >= 0            (fit_intercept=False)
                                        and y^T a = 0         (fit_intercept=True, bias b)

    i.e. min ||w||^2 / 2 s.t. y_i (w . phi(x_i) + b) >= 1, with f(x) = sum_j a_j y_j K(x, x_j) + b.
    With ``normalize=True`` K is first divided by s = (mean_i sqrt(K_ii))^2, i.e. features are divided
    by their mean train norm; this rescales alpha by s and leaves the classifier unchanged.

    Before the solve, inputs that no hard margin can separate (examples with opposite labels and
    numerically identical feature vectors; without a bias, zero feature vectors) raise
    ``NotSeparableError`` at once, and a clearly indefinite K warns. The solve is bounded by
    ``time_limit``: on non-separable data a hard-margin solver never finishes. After the solve,
    everything is verified in float64 on the normalised kernel: the minimum functional training
    margin ``min_i y_i f(x_i)`` (1 for an exact solution) must be >= 1 - ``margin_tol``.

    Args:
        backend: "auto" (currently "sklearn") or "sklearn" (libsvm SMO; without a bias it solves the
            exact no-bias dual through an augmented kernel, see ``sklearn_backend``).
        fit_intercept: fit a bias b. False (default) is the paper's formulation.
        normalize: divide K by s = (mean_i sqrt(K_ii))^2 (cross kernels too).
        tol: the solver's stopping tolerance (libsvm: KKT violation).
        max_iter: solver iteration limit, None for none.
        time_limit: seconds before the solve is abandoned with SolverError (non-separable data with a
            hard margin never converges); None for none.
        margin_tol: accepted shortfall of the minimum training margin below 1. The default 1e-2 covers
            libsvm's float32 kernel cache, which leaves margins short by up to ~1e-2 on hard kernels
            whatever ``tol``; the true value is reported in ``min_margin_``.

    Attributes:
        alpha_: (n,) dual variables a >= 0, in the normalised kernel's scale.
        dual_coef_: (n_support_,) a_i y_i of the support vectors (normalised kernel's scale).
        support_: (n_support_,) indices of the training examples with a_i > 0.
        n_support_: number of support vectors (int).
        intercept_: b (0.0 when ``fit_intercept=False``).
        min_margin_: min_i y_i f(x_i) on the training set, float64.
        dual_objective_: 1^T a - 1/2 a^T Q a (normalised scale) = ||w||^2 / 2 at the optimum.
        duality_gap_: (P - D) / P with P = ||w||^2 / (2 min_margin_^2), the objective of the feasible
            primal point (w, b) / min_margin_, and D = ``dual_objective_``: a certified bound on the
            relative suboptimality.
        scale_: s (1.0 when ``normalize=False``).
        classes_: the two labels in the caller's encoding; ``classes_[1]`` is the positive class.
        n_iter_: solver iterations.
        backend_: the backend used.
        fit_time_: seconds spent in ``fit``.
    """

    def __init__(
        self,
        backend: str = "auto",
        fit_intercept: bool = False,
        normalize: bool = True,
        tol: float = 1e-3,
        max_iter: int | None = None,
        time_limit: float | None = 60.0,
        margin_tol: float = 1e-2,
    ) -> None:
        self.backend = backend
        self.fit_intercept = fit_intercept
        self.normalize = normalize
        self.tol = tol
        self.max_iter = max_iter
        self.time_limit = time_limit
        self.margin_tol = margin_tol

    def __sklearn_tags__(self) -> Tags:
        """Mark the input as a precomputed (pairwise) kernel, so model selection slices it on both axes.

        (scikit-learn >= 1.6; older versions ignore this hook.)
        """
        tags = super().__sklearn_tags__()
        tags.input_tags.pairwise = True
        return tags

    def _check_params(self) -> None:
        for name in ("fit_intercept", "normalize"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise ConfigurationError(f"{name} must be True or False; got {getattr(self, name)!r}.")
        if not _positive_real(self.tol):
            raise ConfigurationError(f"tol must be a positive number (e.g. 1e-3); got {self.tol!r}.")
        if self.max_iter is not None and not (
            isinstance(self.max_iter, Integral) and not isinstance(self.max_iter, bool) and self.max_iter >= 1
        ):
            raise ConfigurationError(f"max_iter must be a positive int or None; got {self.max_iter!r}.")
        if self.time_limit is not None and not _positive_real(self.time_limit):
            raise ConfigurationError(
                f"time_limit must be a positive number of seconds or None; got {self.time_limit!r}."
            )
        if not (_real(self.margin_tol) and 0.0 <= self.margin_tol < 1.0):
            raise ConfigurationError(f"margin_tol must be in [0, 1) (e.g. 1e-2); got {self.margin_tol!r}.")

    def fit(self, K: object, y: object) -> Self:
        """Fit on the train-train kernel K (n x n, numpy or torch) and labels y ({0,1}, {-1,1} or bool).

        Raises:
            ConfigurationError: invalid hyper-parameters or backend.
            KernelError, DataError: malformed K or y.
            NotSeparableError: the data cannot be separated by this kernel.
            SolverError: the solver stopped short of a hard margin (time/iteration limit, tolerance).
        """
        start = time.perf_counter()
        self._check_params()
        backend, solver = _resolve_backend(self.backend)
        K = check_kernel(K)
        y_pm, classes = check_labels(y, K.shape[0])
        scale = float(np.sqrt(np.diagonal(K)).mean() ** 2) if self.normalize else 1.0
        if scale != 1.0:
            K /= scale
        check_separable_precheck(K, y_pm, self.fit_intercept)
        warn_if_indefinite(K)
        result = solver.fit_dual(
            K,
            y_pm,
            bool(self.fit_intercept),
            float(self.tol),
            None if self.max_iter is None else int(self.max_iter),
            None if self.time_limit is None else float(self.time_limit),
        )
        self._verify_and_store(K, y_pm, result, backend)
        self.scale_ = scale
        self.classes_ = classes
        self.backend_ = backend
        self.fit_time_ = time.perf_counter() - start
        return self

    def _verify_and_store(self, K: np.ndarray, y: np.ndarray, result: DualResult, backend: str) -> None:
        alpha, b = result.alpha, float(result.intercept)
        support = np.flatnonzero(alpha > 0)
        f0 = K[:, support] @ (alpha[support] * y[support])
        margins = y * (f0 + b)
        min_margin = float(margins.min())
        if min_margin < 1.0 - self.margin_tol:
            if not result.converged:
                advice = (
                    f"the solver stopped at max_iter={self.max_iter} before converging; raise max_iter or "
                    "set it to None (time_limit still bounds the run)"
                )
            else:
                advice = (
                    f"the {backend!r} solver stopped short at tol={self.tol:g}; use a smaller tol (e.g. "
                    f"{self.tol / 10:g}), or accept the shortfall with margin_tol > {1.0 - min_margin:.3g}"
                    + (
                        " (libsvm caches the kernel in float32, so margins may stay ~1e-2 short)"
                        if backend == "sklearn"
                        else ""
                    )
                )
            raise SolverError(
                f"no hard-margin solution: the minimum training margin is {min_margin:.6g} < 1 - margin_tol = "
                f"{1.0 - self.margin_tol:g} (float64, normalised kernel); {advice}."
            )
        w_sq = float((alpha * y) @ f0)
        dual = float(alpha.sum()) - 0.5 * w_sq
        primal = 0.5 * w_sq / min_margin**2
        self.alpha_ = alpha
        self.support_ = support
        self.dual_coef_ = alpha[support] * y[support]
        self.n_support_ = int(support.size)
        self.intercept_ = b
        self.min_margin_ = min_margin
        self.dual_objective_ = dual
        self.duality_gap_ = (primal - dual) / primal
        self.n_iter_ = int(result.n_iter)

    def decision_function(self, K_cross: object) -> np.ndarray:
        """f(x) = sum_j a_j y_j K(x, x_j) / s + b for each row of the raw n_test x n_train kernel K_cross.

        Positive values mean ``classes_[1]``; |f| = 1 on the margin.
        """
        check_is_fitted(self, "dual_coef_")
        K_cross = check_cross_kernel(K_cross, self.alpha_.shape[0])
        return K_cross[:, self.support_] @ self.dual_coef_ / self.scale_ + self.intercept_

    def predict(self, K_cross: object) -> np.ndarray:
        """Labels in the caller's encoding (``classes_``) for each row of K_cross."""
        return self.classes_[(self.decision_function(K_cross) > 0).astype(np.intp)]

    def score(self, K_cross: object, y: object, sample_weight: object = None) -> float:
        """Accuracy of ``predict(K_cross)`` against y (same encoding as in ``fit``)."""
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        y = np.asarray(y)
        pred = self.predict(K_cross)
        if y.shape != pred.shape:
            raise DataError(f"y must have shape {pred.shape} (one label per row of K_cross); got {y.shape}.")
        unknown = np.setdiff1d(y, self.classes_)
        if unknown.size:
            raise DataError(
                f"y holds labels {unknown[:5].tolist()} not among classes_ {self.classes_.tolist()}; "
                "use the label encoding given to fit."
            )
        w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        return float(np.average(pred == y, weights=w))


def _real(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _positive_real(x: object) -> bool:
    return _real(x) and x > 0
