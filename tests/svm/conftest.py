"""Synthetic kernels for the SVM tests: linearly separable features with a known exact solution."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy.optimize import nnls


@dataclass
class Problem:
    X: np.ndarray
    y: np.ndarray  # {0, 1}
    X_test: np.ndarray
    y_test: np.ndarray

    @property
    def K(self) -> np.ndarray:
        return self.X @ self.X.T

    @property
    def K_test(self) -> np.ndarray:
        return self.X_test @ self.X.T


def make_separable(n: int, d: int = 10, seed: int = 0, n_test: int = 200) -> Problem:
    """Classes centred at 4 e_0 (label 1) and -2 e_0 (label 0) with N(0, 0.25 I) noise.

    Separable through the origin (4 noise standard deviations), but off-centre, so a bias matters.
    """
    rng = np.random.default_rng(seed)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, m)
        X = 0.5 * rng.standard_normal((m, d))
        X[:, 0] += 3.0 * (2 * y - 1) + 1.0
        return X, y

    X, y = draw(n)
    X_test, y_test = draw(n_test)
    return Problem(X, y, X_test, y_test)


def make_multiclass(
    n: int, labels: tuple = (0, 1, 2), d: int = 10, seed: int = 0, n_test: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, X_test, y_test): one Gaussian cluster per label, centred at 4 e_c with N(0, 0.25 I) noise.

    Every "class vs rest" problem is linearly separable through the origin (w = e_c - sum of the others / 2).
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        c = rng.integers(0, len(labels), m)
        X = 0.5 * rng.standard_normal((m, d))
        X[np.arange(m), c] += 4.0
        return X, labels_arr[c]

    X, y = draw(n)
    X_test, y_test = draw(n_test)
    return X, y, X_test, y_test


def no_bias_hard_margin_w(X: np.ndarray, y_pm: np.ndarray) -> np.ndarray:
    """Exact min ||w|| s.t. y_i x_i . w >= 1, as least-distance programming via NNLS (Lawson & Hanson, ch. 23).

    With G = diag(y) X: solve min_u>=0 ||E u - f|| for E = [G^T; 1^T], f = e_{d+1}; then r = E u - f
    and w = -r[:d] / r[d].
    """
    G = y_pm[:, None] * X
    E = np.vstack([G.T, np.ones((1, X.shape[0]))])
    f = np.zeros(X.shape[1] + 1)
    f[-1] = 1.0
    u, _ = nnls(E, f, maxiter=50 * X.shape[0])
    r = E @ u - f
    return -r[:-1] / r[-1]


def make_near_duplicate_pair(eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear features (n = 100, d = 150) where example 1 is example 0 moved by eps of its norm, with the opposite
    label: separable, with a hard margin that needs ||w||^2 ~ 1e8 (eps = 2e-4) to 7e8 (eps = 1e-4) on the
    normalised kernel, below the refusal limit MAX_NORM_SQ = 1e9."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((100, 150))
    y = rng.integers(0, 2, 100)
    noise = rng.standard_normal(150) / np.sqrt(150) * np.linalg.norm(X[0])
    X[1] = X[0] + eps * noise
    y[1] = 1 - y[0]
    return X, y


@pytest.fixture(scope="module")
def separable() -> Problem:
    return make_separable(300)


@pytest.fixture(scope="session")
def make_problem():
    """The ``make_separable`` factory, for tests that need other sizes."""
    return make_separable


@pytest.fixture(scope="session")
def multiclass():
    """The ``make_multiclass`` factory: k separable clusters with the given labels."""
    return make_multiclass


@pytest.fixture(scope="session")
def exact_no_bias_w():
    """The exact no-bias hard-margin weight vector for linear kernels (``no_bias_hard_margin_w``)."""
    return no_bias_hard_margin_w


@pytest.fixture(scope="session")
def near_duplicate_pair():
    """The ``make_near_duplicate_pair`` factory: separable data whose hard margin needs ||w||^2 ~ 1e8."""
    return make_near_duplicate_pair
