"""The contract every hard-margin SVM backend meets, its result type, and the registry of backends.

A backend is a module (``sklearn_backend``, ``torch_backend``, ``auto_backend``, ``thundersvm_backend``,
``cuml_backend``) that conforms to ``HardMarginBackend``; the two on a torch device (``auto``, ``torch``) also to
``DeviceBackend``. ``HardMarginSVM`` loads one by name (``load_backend``) and calls it only through this contract,
on a kernel it has already validated, symmetrised and normalised in float64, and it verifies the returned
solution itself (margins in float64), so a backend only has to solve.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

import numpy as np

from lightning_afterkernel.errors import ConfigurationError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DualResult:
    """What a backend's ``fit_dual`` returns.

    Attributes:
        alpha: (n,) float64 dual variables, alpha_i >= 0, in the scale of the kernel the backend got.
        intercept: bias b (0.0 without an intercept).
        n_iter: solver iterations.
        converged: False when the solver stopped at its iteration limit before its own tolerance.
        backend: the route taken, when a backend combines several (``auto``: e.g. "sklearn+polish").
        info: backend diagnostics (e.g. the interior-point method's final system size), for reports.
        margins: y_i (sum_j alpha_j y_j K_ij + b) in float64 on the kernel the backend got, when the backend
            computed them for alpha and intercept exactly as returned (saves the estimator one n^2 product).
    """

    alpha: np.ndarray
    intercept: float
    n_iter: int
    converged: bool = True
    backend: str | None = None
    info: dict[str, float] = field(default_factory=dict)
    margins: np.ndarray | None = None


@runtime_checkable
class HardMarginBackend(Protocol):
    """A hard-margin solver on a precomputed kernel (a module: its functions are the methods below).

    Attributes:
        DEFAULT_TOL: the stopping tolerance used when the estimator's ``tol`` is None.
        MARGIN_TOL: the accepted shortfall of the minimum training margin below 1 when ``margin_tol`` is None.
    """

    DEFAULT_TOL: float
    MARGIN_TOL: float

    def check_available(self) -> None:
        """Raise ConfigurationError naming the fix when the backend's package or device is missing."""
        ...

    def share_kernel(self, K: np.ndarray) -> object | None:
        """Label-independent work on K (e.g. a factorisation), done once and passed as ``shared`` to every
        ``fit_dual`` on this K (one-vs-rest solves k problems on one kernel); None when there is none."""
        ...

    def fit_dual(
        self,
        K: np.ndarray,
        y_pm: np.ndarray,
        fit_intercept: bool,
        tol: float,
        max_iter: int | None,
        time_limit: float | None,
        *,
        shared: object | None = None,
    ) -> DualResult:
        """Solve max_a 1^T a - 1/2 a^T Q a, a >= 0 (and y^T a = 0 with ``fit_intercept``), Q = diag(y) K diag(y).

        Args:
            K: (n, n) symmetric float64 kernel, mean diagonal > 0 (the estimator's normalised copy; read only).
            y_pm: (n,) labels in {-1.0, +1.0}, both present.
            fit_intercept: with a bias b.
            tol: the solver's stopping tolerance.
            max_iter: iteration limit (None: the solver's own).
            time_limit: seconds before SolverError (None: no limit).
            shared: ``share_kernel(K)`` of this same K, or None (then the backend does that work itself).

        Raises:
            NotSeparableError: the backend certified that no hard margin exists.
            SolverError: time or iteration limit, or a verdict the backend cannot reach.
        """
        ...


@runtime_checkable
class DeviceBackend(HardMarginBackend, Protocol):
    """A backend that computes on a torch device: ``fit_dual`` also takes ``device`` and ``shrinking``."""

    def resolve_device(self, device: torch.device | str | None) -> torch.device:
        """The torch device for ``device`` (None: the CPU); ConfigurationError when it is invalid or missing."""
        ...

    def fit_dual(
        self,
        K: np.ndarray,
        y_pm: np.ndarray,
        fit_intercept: bool,
        tol: float,
        max_iter: int | None,
        time_limit: float | None,
        *,
        shared: object | None = None,
        device: torch.device | str | None = None,
        shrinking: bool = True,
    ) -> DualResult:
        """As ``HardMarginBackend.fit_dual``, on ``device`` (None: the CPU); ``shrinking`` drops clearly
        non-support examples from the interior-point method's system."""
        ...


BACKENDS = {
    "auto": "lightning_afterkernel.svm.auto_backend",
    "torch": "lightning_afterkernel.svm.torch_backend",
    "sklearn": "lightning_afterkernel.svm.sklearn_backend",
    "cuml": "lightning_afterkernel.svm.cuml_backend",
    "thundersvm": "lightning_afterkernel.svm.thundersvm_backend",
}
"""Backend name (``HardMarginSVM(backend=...)``) -> module conforming to ``HardMarginBackend``."""


def load_backend(name: object) -> HardMarginBackend:
    """The backend ``name``, checked to be usable here; ConfigurationError when unknown or not installed."""
    if not isinstance(name, str) or name not in BACKENDS:
        valid = ", ".join(repr(b) for b in BACKENDS)
        raise ConfigurationError(f"unknown backend={name!r}; valid backends: {valid}.")
    backend = cast(HardMarginBackend, importlib.import_module(BACKENDS[name]))
    backend.check_available()
    return backend


def available_backends() -> tuple[str, ...]:
    """Names accepted by ``HardMarginSVM(backend=...)`` whose dependencies are installed here."""
    names = []
    for name in BACKENDS:
        try:
            load_backend(name)
        except ConfigurationError:
            continue
        names.append(name)
    return tuple(names)
