"""thundersvm (linear kernel on a feature factor of K) and cuML, against the interior-point backend.

Skipped when the optional package is not installed (``pip install 'lightning-afterkernel[thundersvm]'``).
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch

from lightning_afterkernel.svm import HardMarginSVM
from lightning_afterkernel.svm.thundersvm_backend import feature_factor


def test_feature_factor_reproduces_the_kernel_and_maps_cross_kernels(separable):
    """Phi Phi^T = K, and Phi_test = K_cross V diag(1/sqrt(lambda)) gives Phi_test Phi^T c = K_cross c."""
    p = separable  # rank 10: 290 eigenvalues are round-off and are dropped
    phi, info = feature_factor(p.K)
    assert phi.shape == (300, 10) and info["feature_rank"] == 10
    np.testing.assert_allclose(phi @ phi.T, p.K, atol=1e-10 * np.abs(p.K).max())
    lam = (phi**2).sum(axis=0)  # Phi = V diag(sqrt(lambda)) has orthogonal columns of squared norm lambda
    phi_test = p.K_test @ (phi / lam)  # = K_cross V diag(1 / sqrt(lambda))
    c = np.random.default_rng(0).standard_normal(300)
    np.testing.assert_allclose(phi_test @ (phi.T @ c), p.K_test @ c, rtol=1e-8, atol=1e-8 * np.abs(p.K_test @ c).max())


def test_feature_factor_reports_and_warns_about_clearly_negative_eigenvalues():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5))
    v = rng.standard_normal(40)
    with pytest.warns(UserWarning, match=r"negative eigenvalues down to"):
        _, info = feature_factor(X @ X.T - 1e-3 * np.outer(v, v))
    assert info["n_dropped_negative"] == 1 and info["min_eigenvalue_rel"] < -1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feature_factor((X @ X.T).astype(np.float32).astype(np.float64))  # round-off only: no warning


@pytest.mark.skipif(importlib.util.find_spec("thundersvm") is None, reason="thundersvm-cpu is not installed")
@pytest.mark.parametrize("fit_intercept", [False, True])
def test_thundersvm_matches_the_interior_point_method(separable, fit_intercept):
    p = separable
    ref = HardMarginSVM(backend="torch", fit_intercept=fit_intercept).fit(p.K, p.y)
    est = HardMarginSVM(backend="thundersvm", fit_intercept=fit_intercept).fit(p.K, p.y)
    assert est.backend_ == "thundersvm" and est.solver_info_["feature_rank"] == 10
    assert est.min_margin_ >= 1.0 - 1e-2
    assert est.dual_objective_ == pytest.approx(ref.dual_objective_, rel=1e-2)
    assert est.dual_objective_ <= ref.dual_objective_ * (1.0 + 1e-12)  # the IPM's optimum bounds every dual point
    np.testing.assert_array_equal(est.predict(p.K_test), ref.predict(p.K_test))
    f, f_ref = est.decision_function(p.K_test), ref.decision_function(p.K_test)
    np.testing.assert_allclose(f, f_ref, atol=2e-2 * np.abs(f_ref).max())
    if fit_intercept:
        assert est.intercept_ == pytest.approx(ref.intercept_, abs=2e-2)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("thundersvm") is None, reason="thundersvm-cpu is not installed")
def test_thundersvm_on_a_full_rank_kernel():
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((200, 10))
    sq = (Z**2).sum(axis=1)
    K = np.exp(-0.05 * (sq[:, None] + sq[None, :] - 2.0 * Z @ Z.T))
    y = (Z[:, 0] > 0).astype(int)
    ref = HardMarginSVM(backend="torch").fit(K, y)
    est = HardMarginSVM(backend="thundersvm").fit(K, y)
    assert est.dual_objective_ == pytest.approx(ref.dual_objective_, rel=1e-2)
    assert np.mean(est.predict(K) == ref.predict(K)) == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("cuml") is None or not torch.cuda.is_available(), reason="needs cuML and CUDA"
)
@pytest.mark.parametrize("fit_intercept", [False, True])
def test_cuml_matches_the_interior_point_method(separable, fit_intercept):
    p = separable
    ref = HardMarginSVM(backend="torch", fit_intercept=fit_intercept).fit(p.K, p.y)
    est = HardMarginSVM(backend="cuml", fit_intercept=fit_intercept).fit(p.K, p.y)
    assert est.min_margin_ >= 1.0 - 1e-2
    assert est.dual_objective_ == pytest.approx(ref.dual_objective_, rel=1e-2)
    np.testing.assert_array_equal(est.predict(p.K_test), ref.predict(p.K_test))
