"""SoftMarginSVM: against independent dual solves, its hard-margin limit, non-separable data, the sklearn API."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from scipy.optimize import minimize, minimize_scalar
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import SVC

from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.svm import HardMarginSVM, SoftMarginSVM
from lightning_afterkernel.svm.sklearn_backend import _hinge_intercept


def _overlapping(n: int, d: int = 5, seed: int = 0, positive_rate: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping Gaussian classes: not separable."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < positive_rate).astype(int)
    X = rng.standard_normal((n, d)) + 0.5 * (2 * y - 1)[:, None] + 0.3
    return X, y


def _reference_dual(K: np.ndarray, y: np.ndarray, C: float, fit_intercept: bool) -> np.ndarray:
    """max 1^T a - 1/2 a^T Q a over 0 <= a <= C (and y^T a = 0): L-BFGS-B (box only) or SLSQP (with y^T a = 0)."""
    Q = (y[:, None] * K) * y[None, :]

    def objective(a: np.ndarray) -> tuple[float, np.ndarray]:
        Qa = Q @ a
        return 0.5 * a @ Qa - a.sum(), Qa - 1.0

    a0 = np.full(y.size, 0.5 * C)
    bounds = [(0.0, C)] * y.size
    if not fit_intercept:
        res = minimize(
            objective, a0, jac=True, method="L-BFGS-B", bounds=bounds, options={"ftol": 1e-15, "gtol": 1e-12}
        )
    else:
        cons = {"type": "eq", "fun": lambda a: y @ a, "jac": lambda a: y}
        res = minimize(
            objective,
            a0,
            jac=True,
            method="SLSQP",
            bounds=bounds,
            constraints=[cons],
            options={"ftol": 1e-12, "maxiter": 2000},
        )
    assert res.success, res.message
    return res.x


def _primal(K: np.ndarray, y: np.ndarray, a: np.ndarray, b: float, C: float) -> float:
    f = K @ (a * y) + b
    return 0.5 * (a * y) @ K @ (a * y) + C * np.maximum(0.0, 1.0 - y * f).sum()


@pytest.mark.parametrize("fit_intercept", [False, True])
def test_matches_an_independent_dual_solve(fit_intercept):
    """Without a bias |y^T a| is about half of sum a here, so the emulation's virtual examples carry real weight."""
    X, y01 = _overlapping(60)
    y = 2.0 * y01 - 1.0
    C = 2.0
    est = SoftMarginSVM(C=C, fit_intercept=fit_intercept, tol=1e-6).fit(X @ X.T, y01)
    Kn = X @ X.T / est.scale_
    a_ref = _reference_dual(Kn, y, C, fit_intercept)
    Q = (y[:, None] * Kn) * y[None, :]
    d_ref = a_ref.sum() - 0.5 * a_ref @ Q @ a_ref
    assert est.dual_objective_ == pytest.approx(d_ref, rel=1e-6)
    assert est.dual_objective_ == pytest.approx(est.alpha_.sum() - 0.5 * est.alpha_ @ Q @ est.alpha_, rel=1e-12)
    np.testing.assert_allclose(est.alpha_, a_ref, atol=1e-3 * C)
    assert ((est.alpha_ >= 0) & (est.alpha_ <= C)).all()
    if fit_intercept:
        # b: independent 1-D minimisation of the primal for the reference alpha.
        b_ref = minimize_scalar(lambda b: _primal(Kn, y, a_ref, b, C), bounds=(-10, 10), method="bounded").x
        assert est.intercept_ == pytest.approx(b_ref, abs=1e-3)
        assert abs(y @ est.alpha_) < 1e-8 * est.alpha_.sum()
    else:
        assert est.intercept_ == 0.0
        assert abs(y @ est.alpha_) > 0.3 * est.alpha_.sum()  # far from the biased SVM's y^T a = 0
    f_ref = Kn @ (a_ref * y) + est.intercept_
    np.testing.assert_allclose(est.decision_function(X @ X.T), f_ref, atol=1e-3 * np.abs(f_ref).max())
    # Strong duality: the primal at the returned (w, b) meets the dual optimum.
    assert est.primal_objective_ == pytest.approx(_primal(Kn, y, est.alpha_, est.intercept_, C), rel=1e-12)
    assert 0.0 <= est.duality_gap_ < 1e-5


def test_bias_matches_sklearn_svc():
    X, y = _overlapping(200, seed=1)
    K = X @ X.T
    est = SoftMarginSVM(C=0.5, fit_intercept=True, normalize=False).fit(K, y)
    ref = SVC(kernel="precomputed", C=0.5).fit(K, y)
    np.testing.assert_array_equal(est.predict(K), ref.predict(K))
    np.testing.assert_allclose(est.decision_function(K), ref.decision_function(K), atol=1e-2)


@pytest.mark.parametrize("fit_intercept", [False, True])
def test_large_C_is_the_hard_margin(separable, fit_intercept):
    p = separable
    hard = HardMarginSVM(fit_intercept=fit_intercept, tol=1e-4).fit(p.K, p.y)
    soft = SoftMarginSVM(C=100.0 * hard.alpha_.max(), fit_intercept=fit_intercept, tol=1e-4).fit(p.K, p.y)
    assert soft.n_at_bound_ == 0
    np.testing.assert_array_equal(soft.predict(p.K_test), hard.predict(p.K_test))
    f_hard = hard.decision_function(p.K_test)
    np.testing.assert_allclose(soft.decision_function(p.K_test), f_hard, atol=5e-3 * np.abs(f_hard).max())
    assert soft.dual_objective_ == pytest.approx(hard.dual_objective_, rel=1e-3)
    assert soft.min_margin_ == pytest.approx(1.0, abs=1e-2)


def test_non_separable_low_rank_kernel_gets_a_soft_margin():
    """The CK-like case that HardMarginSVM refuses: the soft margin fits quickly and reports the violations."""
    X, y = _overlapping(1000, d=20, seed=2)
    K = (X @ X.T).astype(np.float32)
    start = time.perf_counter()
    est = SoftMarginSVM(C=1.0).fit(K, y)
    assert time.perf_counter() - start < 10.0
    assert est.min_margin_ < 0.0 and est.n_at_bound_ > 0
    assert ((est.alpha_ >= 0) & (est.alpha_ <= 1.0)).all()
    assert 0.0 <= est.duality_gap_ < 1e-2
    assert 0.6 < est.score(K, y) < 1.0
    assert est.backend_ == "sklearn" and est.fit_time_ > 0


def test_C_means_the_same_at_every_kernel_scale():
    X, y = _overlapping(150, seed=3)
    K = X @ X.T
    a = SoftMarginSVM(C=0.3).fit(K, y)
    b = SoftMarginSVM(C=0.3).fit(1e4 * K, y)
    assert b.scale_ == pytest.approx(1e4 * a.scale_)
    np.testing.assert_allclose(b.alpha_, a.alpha_, atol=1e-6)
    np.testing.assert_allclose(b.decision_function(1e4 * K), a.decision_function(K), atol=1e-6)
    assert a.scale_ == pytest.approx(np.sqrt(np.diag(K)).mean() ** 2)  # normalised mean feature norm is 1


def test_hinge_intercept_minimises_the_hinge_loss():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        y = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        y[:2] = [-1.0, 1.0]
        f = np.round(rng.standard_normal(n), 1)  # ties make flat minima
        b = _hinge_intercept(f, y, float(rng.standard_normal()))
        grid = np.concatenate([y - f, np.linspace(-5, 5, 2001)])
        h = np.maximum(0.0, 1.0 - y[:, None] * (f[:, None] + grid[None, :])).sum(axis=0)
        assert np.maximum(0.0, 1.0 - y * (f + b)).sum() <= h.min() + 1e-12
    f, y = np.array([0.0, 0.0]), np.array([-1.0, 1.0])  # minimisers [-1, 1]: b0 inside is kept, outside clipped
    assert _hinge_intercept(f, y, 0.25) == 0.25
    assert _hinge_intercept(f, y, 3.0) == 1.0


def test_max_iter_warns_with_the_duality_gap(separable):
    with pytest.warns(ConvergenceWarning, match="max_iter=2 before converging .*duality gap"):
        SoftMarginSVM(max_iter=2).fit(separable.K, separable.y)


def test_params_round_trip_and_validation(separable):
    params = dict(C=3.0, fit_intercept=True, normalize=False, tol=1e-4, max_iter=500, time_limit=None)
    est = SoftMarginSVM(**params)
    assert est.get_params() == params and clone(est).get_params() == params
    assert not any(k.endswith("_") for k in vars(SoftMarginSVM(C=-1.0)))
    for bad, match in [
        ({"C": 0.0}, "C must be a positive"),
        ({"C": "1"}, "C must be a positive"),
        ({"tol": -1.0}, "tol must be a positive"),
        ({"fit_intercept": 1}, "fit_intercept must be"),
    ]:
        with pytest.raises(ConfigurationError, match=match):
            SoftMarginSVM(**bad).fit(separable.K, separable.y)


def test_no_convergence_warning_on_a_normal_fit(separable):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = SoftMarginSVM().fit(separable.K, separable.y)
    assert est.score(separable.K_test, separable.y_test) == 1.0
