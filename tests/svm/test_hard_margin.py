"""HardMarginSVM on separable linear kernels: exact solutions, KKT conditions, encodings, sklearn API."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score
from sklearn.svm import SVC

from lightning_afterkernel.errors import DataError
from lightning_afterkernel.svm import HardMarginSVM, available_backends


def test_fit_returns_self_and_fitted_attributes(separable):
    K, y = separable.K, separable.y
    est = HardMarginSVM()
    assert est.fit(K, y) is est
    n = len(y)
    assert est.backend_ == "sklearn+polish"  # auto on the CPU: libsvm, then the exact polish
    assert est.alpha_.shape == (n,) and est.alpha_.dtype == np.float64
    assert isinstance(est.n_support_, int) and est.n_support_ == est.support_.size > 0
    np.testing.assert_array_equal(est.support_, np.flatnonzero(est.alpha_ > 0))
    np.testing.assert_allclose(est.dual_coef_, est.alpha_[est.support_] * (2.0 * y[est.support_] - 1.0))
    assert est.intercept_ == 0.0
    assert est.scale_ == pytest.approx(np.sqrt(np.diag(K)).mean() ** 2)
    np.testing.assert_array_equal(est.classes_, [0, 1])
    assert est.n_iter_ > 0 and est.fit_time_ > 0.0


def test_no_bias_solution_matches_exact_reference(separable, exact_no_bias_w):
    """The no-bias hard margin (libsvm through the augmented kernel) equals the exact LDP solution."""
    p = separable
    y_pm = 2.0 * p.y - 1.0
    w = exact_no_bias_w(p.X, y_pm)
    assert (y_pm * (p.X @ w)).min() == pytest.approx(1.0, abs=1e-8)
    est = HardMarginSVM(fit_intercept=False, tol=1e-4).fit(p.K, p.y)
    ref = p.X_test @ w
    np.testing.assert_allclose(est.decision_function(p.K_test), ref, atol=2e-3 * np.abs(ref).max())
    np.testing.assert_array_equal(est.predict(p.K_test), (ref > 0).astype(int))
    # ||w||^2 / 2 in the normalised feature space x / sqrt(s) is s ||w||^2 / 2.
    assert est.dual_objective_ == pytest.approx(0.5 * est.scale_ * w @ w, rel=2e-3)


def test_bias_solution_matches_sklearn_linear_svc(separable):
    p = separable
    est = HardMarginSVM(fit_intercept=True).fit(p.K, p.y)
    ref = SVC(kernel="linear", C=1e10).fit(p.X, p.y)
    np.testing.assert_array_equal(est.predict(p.K_test), ref.predict(p.X_test))
    f_ref = ref.decision_function(p.X_test)
    np.testing.assert_allclose(est.decision_function(p.K_test), f_ref, atol=5e-3 * np.abs(f_ref).max())
    assert est.intercept_ == pytest.approx(ref.intercept_[0], abs=5e-3)


def test_no_bias_is_not_the_biased_svm(separable):
    """The emulation solves the dual without y^T a = 0 (a constant added to K would not)."""
    p = separable
    free = HardMarginSVM(fit_intercept=False).fit(p.K, p.y)
    biased = HardMarginSVM(fit_intercept=True).fit(p.K, p.y)
    y_pm = 2.0 * p.y - 1.0
    assert abs(y_pm @ free.alpha_) > 0.1 * free.alpha_.sum()
    assert abs(y_pm @ biased.alpha_) < 1e-6 * biased.alpha_.sum()
    assert abs(biased.intercept_) > 0.1
    # A free bias can only enlarge the margin: smaller ||w||^2 / 2.
    assert biased.dual_objective_ < 0.9 * free.dual_objective_


@pytest.mark.parametrize("fit_intercept", [False, True])
def test_kkt_conditions(separable, fit_intercept):
    p = separable
    est = HardMarginSVM(fit_intercept=fit_intercept).fit(p.K, p.y)
    Kn = p.K / est.scale_
    y_pm = 2.0 * p.y - 1.0
    a = est.alpha_
    f = Kn @ (a * y_pm) + est.intercept_
    margins = y_pm * f
    assert (a >= 0).all()
    assert margins.min() == pytest.approx(est.min_margin_)
    assert abs(est.min_margin_ - 1.0) <= 1e-9
    # Complementary slackness: a_i (m_i - 1) = 0, relative to the dual's scale.
    assert np.abs(a * (margins - 1.0)).sum() <= 1e-9 * a.sum()
    if fit_intercept:
        assert abs(y_pm @ a) <= 1e-9 * a.sum()
    Q = (y_pm[:, None] * Kn) * y_pm[None, :]
    assert est.dual_objective_ == pytest.approx(a.sum() - 0.5 * a @ Q @ a, rel=1e-10)
    assert 0.0 <= est.duality_gap_ < 1e-9
    assert est.score(p.K, p.y) == 1.0


def test_normalize_changes_only_the_scale_of_alpha(separable):
    p = separable
    a = HardMarginSVM(normalize=True).fit(p.K, p.y)
    b = HardMarginSVM(normalize=False).fit(p.K, p.y)
    assert b.scale_ == 1.0 and a.scale_ > 10.0
    np.testing.assert_array_equal(a.predict(p.K_test), b.predict(p.K_test))
    fa, fb = a.decision_function(p.K_test), b.decision_function(p.K_test)
    np.testing.assert_allclose(fa, fb, atol=3e-3 * np.abs(fb).max())
    np.testing.assert_allclose(a.alpha_.sum(), b.alpha_.sum() * a.scale_, rtol=3e-3)


@pytest.mark.parametrize(
    "encode",
    [
        lambda y: y,
        lambda y: 2 * y - 1,
        lambda y: y.astype(bool),
        lambda y: y.astype(np.float32),
    ],
    ids=["01", "pm1", "bool", "float01"],
)
def test_label_encodings_give_the_same_classifier(separable, encode):
    p = separable
    ref = HardMarginSVM().fit(p.K, p.y)
    y_enc = encode(p.y)
    est = HardMarginSVM().fit(p.K, y_enc)
    np.testing.assert_array_equal(est.classes_, np.unique(y_enc))
    pred = est.predict(p.K_test)
    assert pred.dtype == y_enc.dtype
    np.testing.assert_array_equal(pred, encode(ref.predict(p.K_test)))
    np.testing.assert_allclose(est.decision_function(p.K_test), ref.decision_function(p.K_test))
    assert est.score(p.K_test, encode(p.y_test)) == ref.score(p.K_test, p.y_test)


def test_torch_tensors_are_accepted(separable):
    p = separable
    ref = HardMarginSVM().fit(p.K, p.y)
    K_t = torch.from_numpy(p.K).float()
    est = HardMarginSVM().fit(K_t, torch.from_numpy(p.y))
    K_test_t = torch.from_numpy(p.K_test).float()
    np.testing.assert_array_equal(est.predict(K_test_t), ref.predict(p.K_test))
    f, f_ref = est.decision_function(K_test_t), ref.decision_function(p.K_test)
    np.testing.assert_allclose(f, f_ref, atol=1e-2 * np.abs(f_ref).max())
    assert est.score(K_test_t, torch.from_numpy(p.y_test)) == ref.score(p.K_test, p.y_test)


def test_fit_does_not_modify_the_callers_kernel(separable):
    K = separable.K.copy()
    K[0, 1] += 1e-6 * np.abs(K).max()  # asymmetric within tolerance: the estimator symmetrises a copy
    before = K.copy()
    HardMarginSVM().fit(K, separable.y)
    np.testing.assert_array_equal(K, before)
    K_t = torch.from_numpy(before.copy())  # float64 CPU tensor: must not be modified in place either
    HardMarginSVM().fit(K_t, separable.y)
    np.testing.assert_array_equal(K_t.numpy(), before)


def test_init_stores_only_and_params_round_trip():
    est = HardMarginSVM(backend="nonsense", tol=-1.0, margin_tol=5.0)
    assert est.backend == "nonsense" and est.tol == -1.0  # validated in fit, not in __init__
    assert not any(k.endswith("_") and not k.startswith("_") for k in vars(est))
    params = dict(
        backend="torch",
        fit_intercept=True,
        normalize=False,
        tol=1e-4,
        max_iter=1000,
        time_limit=None,
        margin_tol=1e-3,
        rank_tol=None,
        device="cpu",
        shrinking=False,
    )
    est = HardMarginSVM(**params)
    assert est.get_params() == params
    assert clone(est).get_params() == params
    assert est.set_params(tol=1e-2) is est and est.get_params()["tol"] == 1e-2


def test_decision_function_before_fit_raises(separable):
    with pytest.raises(NotFittedError):
        HardMarginSVM().decision_function(separable.K_test)


def test_score_rejects_labels_in_another_encoding(separable):
    est = HardMarginSVM().fit(separable.K, separable.y)
    with pytest.raises(DataError, match="label encoding"):
        est.score(separable.K_test, 2 * separable.y_test - 1)


def test_cross_validation_slices_the_precomputed_kernel(separable):
    scores = cross_val_score(HardMarginSVM(), separable.K, separable.y, cv=3)
    assert scores.shape == (3,) and (scores == 1.0).all()


def test_available_backends():
    names = available_backends()
    assert names[:3] == ("auto", "torch", "sklearn")
    assert ("cuml" in names) == (importlib.util.find_spec("cuml") is not None and torch.cuda.is_available())


def test_in_process_and_child_process_fits_agree(separable):
    a = HardMarginSVM(backend="sklearn", time_limit=None).fit(separable.K, separable.y)
    b = HardMarginSVM(backend="sklearn", time_limit=30.0).fit(separable.K, separable.y)
    np.testing.assert_array_equal(a.alpha_, b.alpha_)
    assert a.n_iter_ == b.n_iter_


def test_larger_problem_is_fast(make_problem):
    p = make_problem(2000, d=20, seed=1)
    est = HardMarginSVM().fit(p.K, p.y)
    assert est.min_margin_ >= 1.0 - 1e-9
    assert est.score(p.K_test, p.y_test) == 1.0
    assert est.fit_time_ < 20.0
