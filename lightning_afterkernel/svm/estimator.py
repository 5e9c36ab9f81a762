"""``HardMarginSVM`` and ``SoftMarginSVM``: SVMs on a precomputed kernel, scikit-learn style."""

from __future__ import annotations

import functools
import math
import sys
import time
import warnings
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Self

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import ThreadpoolController

from lightning_afterkernel.errors import ConfigurationError, DataError, NotSeparableError, SolverError
from lightning_afterkernel.svm import sklearn_backend
from lightning_afterkernel.svm._checks import (
    binary_targets,
    check_and_normalize_kernel,
    check_cross_kernel,
    check_labels,
    check_separable_precheck,
    warn_if_indefinite,
)
from lightning_afterkernel.svm.lowrank import RANK_TOL, Certificate, KernelFactor, certify_separability, kernel_factor
from lightning_afterkernel.svm.protocol import DeviceBackend, DualResult, load_backend

if TYPE_CHECKING:
    from sklearn.utils import Tags


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """One controller for the process: building one scans every loaded library (15 ms, as long as a small fit)."""
    return ThreadpoolController()


def _kernel_device(K: object) -> str | None:
    """The device of a torch kernel (e.g. "cuda:0"), None for anything else."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(K, torch.Tensor):
        return str(K.device)
    return None


class _KernelSVM(ClassifierMixin, BaseEstimator):
    """What ``HardMarginSVM`` and ``SoftMarginSVM`` share: input checks, normalisation, prediction.

    Subclasses define ``__init__`` (their hyper-parameters), ``_check_params``, and the steps of a fit on the
    normalised kernel: ``_certify`` (checks before solving), ``_solve``, and for one-vs-rest ``_share`` (work on K
    done once) and ``_combine`` (their own per-class attributes).
    """

    def __sklearn_tags__(self) -> Tags:
        """Mark the input as a precomputed (pairwise) kernel, so model selection slices it on both axes.

        (scikit-learn >= 1.6; older versions ignore this hook.)
        """
        tags = super().__sklearn_tags__()
        tags.input_tags.pairwise = True
        return tags

    def check_params(self) -> Self:
        """Validate the hyper-parameters now (``fit`` does it too); raise ConfigurationError; return self."""
        self._check_params()
        return self

    def _check_params(self) -> None:
        for name in ("fit_intercept", "normalize"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise ConfigurationError(f"{name} must be True or False; got {getattr(self, name)!r}.")
        if self.tol is not None and not _positive_real(self.tol):
            raise ConfigurationError(f"tol must be a positive number (e.g. 1e-3) or None; got {self.tol!r}.")
        if self.max_iter is not None and not (
            isinstance(self.max_iter, Integral) and not isinstance(self.max_iter, bool) and self.max_iter >= 1
        ):
            raise ConfigurationError(f"max_iter must be a positive int or None; got {self.max_iter!r}.")
        if self.time_limit is not None and not _positive_real(self.time_limit):
            raise ConfigurationError(
                f"time_limit must be a positive number of seconds or None; got {self.time_limit!r}."
            )

    def _fit(self, K: object, y: object) -> Self:
        # numpy's OpenBLAS threads spin against torch's OpenMP threads on few cores (a 0.1 s pivoted Cholesky
        # took 1.4 s right after a torch Cholesky on 2 cores); its products here are memory-bound anyway.
        with _blas_controller().limit(limits=1, user_api="blas"):
            return self._fit_single_blas(K, y)

    def _fit_single_blas(self, K: object, y: object) -> Self:
        start = time.perf_counter()
        self._check_params()
        # pad: room for the SMO's no-bias emulation; the division by the scale is part of the one copy
        K_in, (K, scale) = (
            K,
            check_and_normalize_kernel(K, pad=0 if self.fit_intercept else 2, normalize=self.normalize),
        )
        labels, classes = check_labels(y, K.shape[0])
        if classes.size == 2:
            y_pm = binary_targets(labels, classes[1])
            certificate = self._certify(K, y_pm, None, 0.0)
            seconds = 0.0 if certificate is None else certificate.seconds
            self._solve(K, y_pm, _kernel_device(K_in), None, certificate, seconds)
        else:
            self._fit_one_vs_rest(K, labels, classes, scale, _kernel_device(K_in), start)
        self.scale_ = scale
        self.classes_ = classes
        self.fit_time_ = time.perf_counter() - start
        return self

    def _fit_one_vs_rest(
        self,
        K: np.ndarray,
        labels: np.ndarray,
        classes: np.ndarray,
        scale: float,
        kernel_device: str | None,
        start: float,
    ) -> None:
        """k binary problems "class c vs rest" on the one normalised K, each checked, solved and verified as a
        binary fit is; label-independent work on K is done once (``_share``). Every problem's checks and
        certificate run before the first solve, so non-separable classes are all named before any solving."""
        shared = self._share(K)
        targets = [binary_targets(labels, label) for label in classes]
        estimators = [clone(self) for _ in classes]
        seconds = np.zeros(classes.size)
        certificates, failures = [], []
        for c, (est, y_pm) in enumerate(zip(estimators, targets, strict=True)):
            t0 = time.perf_counter()
            try:
                certificates.append(est._certify(K, y_pm, shared, t0 - start))
            except SolverError as err:
                failures.append((classes[c], err))
            seconds[c] = time.perf_counter() - t0
        if failures:
            raise _class_error(failures)
        for c, (est, y_pm) in enumerate(zip(estimators, targets, strict=True)):
            t0 = time.perf_counter()
            try:
                est._solve(K, y_pm, kernel_device, shared, certificates[c], t0 - start)
            except SolverError as err:
                raise _class_error([(classes[c], err)]) from err
            est.scale_, est.classes_ = scale, np.array([0, 1])
            est.fit_time_ = seconds[c] + time.perf_counter() - t0
        self.estimators_ = estimators
        Y = np.stack(targets)
        self.alpha_ = np.stack([est.alpha_ for est in estimators])
        self.support_ = np.flatnonzero((self.alpha_ > 0).any(axis=0))
        self.dual_coef_ = (self.alpha_ * Y)[:, self.support_]
        self.n_support_ = int(self.support_.size)
        self.min_margin_ = min(est.min_margin_ for est in estimators)
        for name in ("intercept_", "n_iter_", "dual_objective_", "duality_gap_"):
            setattr(self, name, np.array([getattr(est, name) for est in estimators]))
        self._combine(estimators)

    def _share(self, K: np.ndarray) -> _SharedKernel:
        """Label-independent work on K for the problems of a one-vs-rest fit (done once)."""
        raise NotImplementedError

    def _certify(
        self, K: np.ndarray, y: np.ndarray, shared: _SharedKernel | None, seconds_used: float
    ) -> Certificate | None:
        """Checks before the solve on the normalised float64 kernel; ``shared``: ``_share(K)``, or None for a
        binary fit (which does that work itself); ``seconds_used``: time already spent of ``time_limit``."""
        raise NotImplementedError

    def _solve(
        self,
        K: np.ndarray,
        y: np.ndarray,
        kernel_device: str | None,
        shared: _SharedKernel | None,
        certificate: Certificate | None,
        seconds_used: float,
    ) -> None:
        """Solve, verify and set the fitted attributes; ``kernel_device``: where the caller's K lived."""
        raise NotImplementedError

    def _combine(self, estimators: list[Self]) -> None:
        """Set the one-vs-rest attributes that are not common to every SVM, from the k binary estimators."""
        raise NotImplementedError

    def _solver_args(
        self, default_tol: float, seconds_used: float = 0.0
    ) -> tuple[bool, float, int | None, float | None]:
        """(fit_intercept, tol, max_iter, time left of ``time_limit`` after ``seconds_used``) for a backend."""
        left = None if self.time_limit is None else max(float(self.time_limit) - seconds_used, 1e-3)
        tol = default_tol if self.tol is None else float(self.tol)
        return bool(self.fit_intercept), tol, None if self.max_iter is None else int(self.max_iter), left

    @staticmethod
    def _training_fit(K: np.ndarray, y: np.ndarray, result: DualResult) -> tuple[np.ndarray, np.ndarray, float]:
        """(support, margins y_i f(x_i), a^T Q a = ||w||^2) of a solution, in float64."""
        alpha = result.alpha
        if result.margins is not None:  # computed by the backend for exactly this alpha and intercept
            margins = result.margins
            f0 = y * margins - float(result.intercept)
        else:
            f0 = K @ (alpha * y)
            margins = y * (f0 + float(result.intercept))
        return np.flatnonzero(alpha > 0), margins, float((alpha * y) @ f0)

    def _store_dual(self, y: np.ndarray, result: DualResult, support: np.ndarray, margins: np.ndarray) -> None:
        """Set the fitted attributes every SVM has."""
        self.alpha_ = result.alpha
        self.support_ = support
        self.dual_coef_ = result.alpha[support] * y[support]
        self.n_support_ = int(support.size)
        self.intercept_ = float(result.intercept)
        self.min_margin_ = float(margins.min())
        self.n_iter_ = int(result.n_iter)

    def decision_function(self, K_cross: object) -> np.ndarray:
        """f(x) = sum_j a_j y_j K(x, x_j) / s + b for each row of the raw n_test x n_train kernel K_cross.

        Two classes: shape (n_test,), positive values mean ``classes_[1]``; |f| = 1 on the margin. k > 2 classes:
        shape (n_test, k), column c the decision value of "``classes_[c]`` vs rest" (``estimators_[c]``).
        """
        check_is_fitted(self, "dual_coef_")
        K_cross = check_cross_kernel(K_cross, self.alpha_.shape[-1])
        return K_cross[:, self.support_] @ self.dual_coef_.T / self.scale_ + self.intercept_

    def predict(self, K_cross: object) -> np.ndarray:
        """Labels in the caller's encoding (``classes_``) for each row of K_cross; k > 2: the class of the largest
        decision value."""
        f = self.decision_function(K_cross)
        if f.ndim == 2:
            return self.classes_[np.argmax(f, axis=1)]
        return self.classes_[(f > 0).astype(np.intp)]

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


class HardMarginSVM(_KernelSVM):
    """Hard-margin SVM on a precomputed kernel (by default without a bias, as in the paper); k > 2 classes
    one-vs-rest.

    Solves, with Q = diag(y) K diag(y) and y in {-1, +1},

        max_a  1^T a - 1/2 a^T Q a   s.t.  a >= 0            (fit_intercept=False)
                                        and y^T a = 0         (fit_intercept=True, bias b)

    i.e. min ||w||^2 / 2 s.t. y_i (w . phi(x_i) + b) >= 1, with f(x) = sum_j a_j y_j K(x, x_j) + b.
    With ``normalize=True`` K is first divided by s = (mean_i sqrt(K_ii))^2, i.e. features are divided
    by their mean train norm; this rescales alpha by s and leaves the classifier unchanged.

    Backends (one module each in ``lightning_afterkernel.svm``):

    - ``"auto"`` (default): a true hard margin by the fastest route. On a CUDA device the interior-point
      method; on the CPU libsvm followed by an exact polish, or the interior-point method when libsvm does not
      finish within about the interior-point method's own time (``auto_backend``). Margins >= 1 - 1e-9.
    - ``"torch"``: a float64 primal-dual interior-point method on any torch device (``torch_backend``):
      9-30 iterations of one Cholesky each, margins >= 1 - 1e-9, non-separable data detected in seconds.
      A GPU method: n = 2,000 in ~2 s and n = 12,000 in minutes on 2 CPU cores. (When ||w||^2 of the hard
      margin exceeds ~1e5, float64 resolves the margins of "auto" and "torch" only to ~7e-15 ||w||^2
      max_i K_ii / mean K_ii, e.g. 1e-7 at ||w||^2 = 1.5e7.)
    - ``"sklearn"``: libsvm's SMO with a huge box bound (``sklearn_backend``; without a bias through an
      exact emulation with two virtual examples). Fast on easy kernels; float32 kernel cache, so margins
      may fall ~1e-2 short of 1. Alphas at the box bound raise ``NotSeparableError`` only when they certify
      it in float64; otherwise (a margin too small for libsvm) ``SolverError``, pointing to "auto"/"torch".
    - ``"cuml"``: cuML's GPU SMO on the precomputed kernel (``cuml_backend``; needs cuML >= 26.02 and CUDA).
    - ``"thundersvm"``: thundersvm's linear kernel on explicit features Phi with K = Phi Phi^T from an
      eigendecomposition (``thundersvm_backend``; needs the ``thundersvm-cpu`` package). Never its
      precomputed mode, which trains an RBF kernel on the rows of K (upstream issue #66).

    Before the solve, inputs that no hard margin can separate raise ``NotSeparableError`` at once:
    examples with opposite labels and numerically identical feature vectors and, without a bias, zero
    feature vectors (O(n^2)); and **low-rank kernels with no separating direction** (``lowrank``): a
    pivoted Cholesky factor K ~ L L^T (n x r) is computed at ``rank_tol``, and when r < n a linear program
    on L decides exactly whether some direction of the span separates the data (with a free bias when
    ``fit_intercept``); if none does, its dual gives a convex combination of the examples' signed features
    that is (numerically) zero, which bounds the geometric margin of every separator of K by sqrt(q)
    (q = that combination's squared norm, computed from K), and the error is raised when q <= ``rank_tol``
    * max K_ii. Cost: O(n r^2) for the factor plus linear programs growing ~r^3: refusing takes 0.1 s at
    r = 100 (the quickstart's conjugate kernels, n = 1,000, r = 77-89: 0.07 s instead of a 60 s time-out),
    0.3-0.4 s at r = 200, for n up to 12,000; proving separability 0.1-0.5 s at r = 100, 2-3 s at r = 200
    (then the solve runs as usual). Kernels of rank above min(200, n / 2) (NTKs, RBF kernels) skip it after
    200 factor steps (0.03 s at n = 12,000). A clearly indefinite K warns.

    The solve is bounded by ``time_limit``. After it, everything is verified in float64 on the normalised
    kernel: the minimum functional training margin ``min_i y_i f(x_i)`` (1 for an exact solution) must be
    >= 1 - ``margin_tol``.

    **k > 2 classes** (labels: any integers or strings; ``classes_`` sorted): one-vs-rest on the same kernel, k
    binary problems "``classes_[c]`` (+1) vs the rest (-1)", each checked, certified, solved and verified exactly
    as a binary fit on labels ``y == classes_[c]`` is (same alphas, bit for bit). K is validated and normalised
    once, and what does not depend on the labels is done once: the indefiniteness warning, the low-rank
    certificate's factor, and the backend's ``share_kernel`` (thundersvm's eigendecomposition). All k pre-checks
    and certificates run before the first solve. A class with no hard margin raises ``NotSeparableError``
    (``SolverError`` for other failures) whose message starts "class 7 vs rest is not separable: " and names
    the other classes the pre-checks refused. ``predict`` returns the class of the largest decision value.

    Args:
        backend: "auto", "torch", "sklearn", "cuml" or "thundersvm" (see above).
        fit_intercept: fit a bias b. False (default) is the paper's formulation.
        normalize: divide K by s = (mean_i sqrt(K_ii))^2 (cross kernels too).
        tol: the solver's stopping tolerance; None for the backend's default: the relative duality gap 1e-9
            for "auto" and "torch" (interior-point method), the KKT violation 1e-3 for the SMO backends.
        max_iter: solver iteration limit, None for the backend's own (interior-point method: 200).
        time_limit: seconds for the certificate and the solve together before the fit is abandoned with
            SolverError (an SMO never converges on non-separable data); None for none. For k > 2 classes it
            bounds all k problems together.
        margin_tol: accepted shortfall of the minimum training margin below 1; None for the backend's default:
            1e-6 for "auto" and "torch", 1e-2 for the SMO backends (libsvm's float32 kernel cache leaves
            margins short by up to ~1e-2 on hard kernels whatever ``tol``). The true value is in ``min_margin_``.
        rank_tol: relative residual (of max K_ii) below which a direction of K counts as numerically absent
            in the low-rank certificate; a separation needing such directions has a geometric margin below
            sqrt(rank_tol) of the largest feature norm and is not trusted. The default 1e-5 lies above the
            float32 round-off seen in practice (<= 3.2e-6; see ``lowrank``); use ~1e-9 for float64 kernels.
            None skips the certificate.
        device: torch device of the interior-point method ("auto" and "torch" only); None: the device of K
            when K is a torch tensor, else the CPU.
        shrinking: let the interior-point method drop clearly non-support examples from its linear system
            (verified at the end; "auto" and "torch" only).

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
        numerical_rank_: the kernel's rank r at ``rank_tol`` found by the certificate, or None (skipped:
            rank above the cap, or ``rank_tol=None``).
        scale_: s (1.0 when ``normalize=False``).
        classes_: the two labels in the caller's encoding; ``classes_[1]`` is the positive class.
        n_iter_: solver iterations ("auto": libsvm's plus the polish's solves or the interior-point iterations).
        backend_: the backend used; for "auto" the route: "torch", "sklearn+polish" or "sklearn+torch".
        solver_info_: the backend's diagnostics (dict; e.g. thundersvm's feature rank and dropped eigenvalues).
        fit_time_: seconds spent in ``fit``.

    With k > 2 classes (one-vs-rest) the attributes are, for the k problems in the order of ``classes_``:
        estimators_: k fitted binary ``HardMarginSVM``; ``estimators_[c]`` has every attribute above for
            "``classes_[c]`` vs rest", with ``classes_ = [0, 1]`` (1: ``classes_[c]``).
        alpha_: (k, n); support_: (n_support_,) the examples with a_i > 0 in any problem; n_support_: their
            number (int); dual_coef_: (k, n_support_), row c the a_i y_i of problem c on ``support_`` (0 where
            that example is not one of its support vectors).
        intercept_, n_iter_, dual_objective_, duality_gap_: (k,) arrays; backend_, solver_info_: lists of k.
        min_margin_: the smallest of the k minimum training margins (float); scale_, numerical_rank_ (K's),
            fit_time_: as above, for the whole fit; classes_: the k sorted labels.
    """

    def __init__(
        self,
        backend: str = "auto",
        fit_intercept: bool = False,
        normalize: bool = True,
        tol: float | None = None,
        max_iter: int | None = None,
        time_limit: float | None = 60.0,
        margin_tol: float | None = None,
        rank_tol: float | None = RANK_TOL,
        device: str | None = None,
        shrinking: bool = True,
    ) -> None:
        self.backend = backend
        self.fit_intercept = fit_intercept
        self.normalize = normalize
        self.tol = tol
        self.max_iter = max_iter
        self.time_limit = time_limit
        self.margin_tol = margin_tol
        self.rank_tol = rank_tol
        self.device = device
        self.shrinking = shrinking

    def _check_params(self) -> None:
        backend = load_backend(self.backend)
        super()._check_params()
        if self.margin_tol is not None and not (_real(self.margin_tol) and 0.0 <= self.margin_tol < 1.0):
            raise ConfigurationError(f"margin_tol must be in [0, 1) (e.g. 1e-2) or None; got {self.margin_tol!r}.")
        if self.rank_tol is not None and not (_real(self.rank_tol) and 0.0 < self.rank_tol < 1.0):
            raise ConfigurationError(
                f"rank_tol must be in (0, 1) (e.g. {RANK_TOL:g}) or None to skip the certificate; got "
                f"{self.rank_tol!r}."
            )
        if not isinstance(self.shrinking, bool | np.bool_):
            raise ConfigurationError(f"shrinking must be True or False; got {self.shrinking!r}.")
        if self.device is not None:
            if not isinstance(backend, DeviceBackend):
                raise ConfigurationError(
                    f"device={self.device!r} applies to the interior-point backends 'auto' and 'torch' only; "
                    f"backend={self.backend!r} picks its own device. Pass device=None."
                )
            backend.resolve_device(self.device)

    def fit(self, K: object, y: object) -> Self:
        """Fit on the train-train kernel K (n x n, numpy or torch) and labels y: {0,1}, {-1,1} or bool for two
        classes; integers or strings for k > 2 (one-vs-rest).

        Raises:
            ConfigurationError: invalid hyper-parameters or backend.
            KernelError, DataError: malformed K or y.
            NotSeparableError: the data cannot be separated by this kernel (including the low-rank
                certificate: numerical rank r < n and no separating direction in the span); for k > 2 the
                message starts "class <label> vs rest is not separable: ".
            SolverError: the solver stopped short of a hard margin (time/iteration limit, tolerance); for k > 2
                the message starts "class <label> vs rest has no hard-margin solution: ".
        """
        return self._fit(K, y)

    def _share(self, K: np.ndarray) -> _SharedKernel:
        warn_if_indefinite(K)
        factor = None if self.rank_tol is None else kernel_factor(K, float(self.rank_tol))
        return _SharedKernel(factor=factor, backend=load_backend(self.backend).share_kernel(K))

    def _certify(
        self, K: np.ndarray, y: np.ndarray, shared: _SharedKernel | None, seconds_used: float
    ) -> Certificate | None:
        check_separable_precheck(K, y, self.fit_intercept)
        if shared is None:
            warn_if_indefinite(K)
        if self.rank_tol is None:
            return None
        fit_intercept, _, _, time_limit = self._solver_args(load_backend(self.backend).DEFAULT_TOL, seconds_used)
        factor = None if shared is None else shared.factor
        return certify_separability(K, y, fit_intercept, float(self.rank_tol), time_limit, factor=factor)

    def _solve(
        self,
        K: np.ndarray,
        y: np.ndarray,
        kernel_device: str | None,
        shared: _SharedKernel | None,
        certificate: Certificate | None,
        seconds_used: float,
    ) -> None:
        solver = load_backend(self.backend)
        args = self._solver_args(solver.DEFAULT_TOL, seconds_used)
        backend_shared = None if shared is None else shared.backend
        if isinstance(solver, DeviceBackend):
            device = self.device or kernel_device
            result = solver.fit_dual(K, y, *args, shared=backend_shared, device=device, shrinking=bool(self.shrinking))
        else:
            result = solver.fit_dual(K, y, *args, shared=backend_shared)
        support, margins, w_sq = self._training_fit(K, y, result)
        min_margin = float(margins.min())
        margin_tol = solver.MARGIN_TOL if self.margin_tol is None else float(self.margin_tol)
        backend = result.backend or self.backend
        if min_margin < 1.0 - margin_tol:
            if not result.converged:
                advice = (
                    f"the solver stopped at max_iter={self.max_iter} before converging; raise max_iter or "
                    "set it to None (time_limit still bounds the run)"
                )
            else:
                tol = solver.DEFAULT_TOL if self.tol is None else self.tol
                advice = (
                    f"the {backend!r} solver stopped short at tol={tol:g}; use a smaller tol (e.g. "
                    f"{tol / 10:g}), backend='auto' (exact), or accept the shortfall with margin_tol > "
                    f"{1.0 - min_margin:.3g}"
                    + (
                        " (libsvm caches the kernel in float32, so margins may stay ~1e-2 short)"
                        if backend == "sklearn"
                        else ""
                    )
                )
            raise SolverError(
                f"no hard-margin solution: the minimum training margin is {min_margin:.6g} < 1 - margin_tol = "
                f"{1.0 - margin_tol:g} (float64, normalised kernel); {advice}."
            )
        self._store_dual(y, result, support, margins)
        dual = float(result.alpha.sum()) - 0.5 * w_sq
        primal = 0.5 * w_sq / min_margin**2
        self.dual_objective_ = dual
        self.duality_gap_ = (primal - dual) / primal
        self.numerical_rank_ = None if certificate is None else certificate.rank
        self.backend_ = backend
        self.solver_info_ = dict(result.info)

    def _combine(self, estimators: list[Self]) -> None:
        self.numerical_rank_ = estimators[0].numerical_rank_  # K's rank: the same for every problem
        self.backend_ = [est.backend_ for est in estimators]
        self.solver_info_ = [est.solver_info_ for est in estimators]


class SoftMarginSVM(_KernelSVM):
    """Soft-margin SVM on a precomputed kernel, the fallback when no hard margin exists; k > 2 classes one-vs-rest.

    Solves min_w,b ||w||^2 / 2 + C sum_i max(0, 1 - y_i (w . phi(x_i) + b)), i.e. the dual

        max_a  1^T a - 1/2 a^T Q a   s.t.  0 <= a <= C   (and y^T a = 0 with fit_intercept=True),

    with the same precomputed-kernel interface, input checks and no-bias emulation (exact for every C, see
    ``sklearn_backend.fit_soft_dual``) as ``HardMarginSVM``. With ``normalize=True`` (the default) K is
    divided by s = (mean_i sqrt(K_ii))^2 first, so the mean training feature norm is 1 and C means the same
    thing at every kernel scale. For separable data and C above every hard-margin dual coefficient it is the
    hard-margin SVM. k > 2 classes: one-vs-rest as in ``HardMarginSVM``, each problem exactly its binary fit.

    Args:
        C: box bound (> 0) on the dual coefficients, in the (normalised) kernel's scale.
        fit_intercept: fit a bias b. False (default) matches the paper's hard-margin formulation.
        normalize: divide K by s = (mean_i sqrt(K_ii))^2 (cross kernels too).
        tol: libsvm's stopping tolerance (KKT violation); None for libsvm's default 1e-3.
        max_iter: solver iteration limit, None for none (stopping there warns, with the duality gap).
        time_limit: seconds before the solve is abandoned with SolverError; None for none (k > 2 classes: for
            all k problems together).

    Attributes:
        alpha_: (n,) dual variables, 0 <= a <= C, in the normalised kernel's scale.
        dual_coef_, support_, n_support_, intercept_, scale_, classes_, n_iter_, fit_time_: as in
            ``HardMarginSVM``. With a bias, b minimises the hinge loss for the returned alpha.
        min_margin_: min_i y_i f(x_i) on the training set (below 1, or negative, when examples violate the
            margin or are misclassified).
        n_at_bound_: number of alphas at C (margin violators).
        dual_objective_: D = 1^T a - 1/2 a^T Q a (normalised scale).
        primal_objective_: P = ||w||^2 / 2 + C sum_i max(0, 1 - y_i f(x_i)) for the returned (w, b).
        duality_gap_: (P - D) / P >= 0, a certified bound on the relative suboptimality.
        backend_: "sklearn".

    With k > 2 classes: ``estimators_`` (k binary ``SoftMarginSVM``), ``alpha_``, ``support_``, ``n_support_``,
    ``dual_coef_``, ``intercept_``, ``n_iter_``, ``dual_objective_``, ``duality_gap_``, ``min_margin_`` as in
    ``HardMarginSVM``, and ``n_at_bound_``, ``primal_objective_``: (k,) arrays. A class that no hard margin
    separates from the rest has ``estimators_[c].min_margin_ <= 0`` (no separator exists, so some training
    example is not on its side) and alphas at C (``n_at_bound_[c] > 0``); with a small C a separable class can
    show both too.
    """

    def __init__(
        self,
        C: float = 1.0,
        fit_intercept: bool = False,
        normalize: bool = True,
        tol: float = 1e-3,
        max_iter: int | None = None,
        time_limit: float | None = 60.0,
    ) -> None:
        self.C = C
        self.fit_intercept = fit_intercept
        self.normalize = normalize
        self.tol = tol
        self.max_iter = max_iter
        self.time_limit = time_limit

    def _check_params(self) -> None:
        super()._check_params()
        if not _positive_real(self.C):
            raise ConfigurationError(f"C must be a positive number (e.g. 1.0); got {self.C!r}.")

    def fit(self, K: object, y: object) -> Self:
        """Fit on the train-train kernel K (n x n, numpy or torch) and labels y: {0,1}, {-1,1} or bool for two
        classes; integers or strings for k > 2 (one-vs-rest).

        Raises:
            ConfigurationError: invalid hyper-parameters.
            KernelError, DataError: malformed K or y.
            SolverError: time limit hit.
        """
        return self._fit(K, y)

    def _share(self, K: np.ndarray) -> _SharedKernel:
        warn_if_indefinite(K)
        return _SharedKernel(factor=None, backend=None)

    def _certify(
        self, K: np.ndarray, y: np.ndarray, shared: _SharedKernel | None, seconds_used: float
    ) -> Certificate | None:
        if shared is None:
            warn_if_indefinite(K)
        return None

    def _solve(
        self,
        K: np.ndarray,
        y: np.ndarray,
        kernel_device: str | None,
        shared: _SharedKernel | None,
        certificate: Certificate | None,
        seconds_used: float,
    ) -> None:
        C = float(self.C)
        result = sklearn_backend.fit_soft_dual(K, y, C, *self._solver_args(sklearn_backend.DEFAULT_TOL, seconds_used))
        support, margins, w_sq = self._training_fit(K, y, result)
        self._store_dual(y, result, support, margins)
        dual = float(self.alpha_.sum()) - 0.5 * w_sq
        primal = 0.5 * w_sq + C * float(np.maximum(0.0, 1.0 - margins).sum())
        self.n_at_bound_ = int(np.count_nonzero(self.alpha_ >= C * (1.0 - sklearn_backend.AT_BOUND_RTOL)))
        self.dual_objective_ = dual
        self.primal_objective_ = primal
        self.duality_gap_ = (primal - dual) / primal
        self.backend_ = "sklearn"
        if not result.converged:
            warnings.warn(
                f"SoftMarginSVM stopped at max_iter={self.max_iter} before converging (relative duality gap "
                f"{self.duality_gap_:.3g}); raise max_iter or set it to None.",
                ConvergenceWarning,
                stacklevel=3,
            )

    def _combine(self, estimators: list[Self]) -> None:
        self.n_at_bound_ = np.array([est.n_at_bound_ for est in estimators])
        self.primal_objective_ = np.array([est.primal_objective_ for est in estimators])
        self.backend_ = "sklearn"


@dataclass(frozen=True)
class _SharedKernel:
    """Label-independent work on one normalised K, done once for the k problems of a one-vs-rest fit."""

    factor: KernelFactor | None
    """The low-rank certificate's pivoted Cholesky factor (None: ``rank_tol=None``, or a soft margin)."""
    backend: object | None
    """The hard-margin backend's ``share_kernel(K)``."""


def _class_error(failures: list[tuple[object, SolverError]]) -> SolverError:
    """The error of a one-vs-rest fit, naming the class of each failed "class vs rest" problem (the first in full).

    A ``NotSeparableError`` (with its ``best_margin``) when the first failure is one, else a ``SolverError``.
    """
    label, err = failures[0]
    verdict = "is not separable" if isinstance(err, NotSeparableError) else "has no hard-margin solution"
    message = f"class {_label(label)} vs rest {verdict}: {err}"
    if len(failures) > 1:
        others = ", ".join(f"class {_label(other)} vs rest" for other, _ in failures[1:])
        message += f" The checks before the solve found these not separable either: {others}."
    if isinstance(err, NotSeparableError):
        return NotSeparableError(message, best_margin=err.best_margin)
    return SolverError(message)


def _label(label: object) -> str:
    """A class label as the caller wrote it: 7, not np.int64(7); 'cat' quoted."""
    return repr(label.item() if isinstance(label, np.generic) else label)


def _real(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _positive_real(x: object) -> bool:
    return _real(x) and x > 0
