"""HardMarginSVM and SoftMarginSVM on k > 2 classes: one-vs-rest on one kernel, against per-class binary fits and
scikit-learn's ``OneVsRestClassifier(SVC(kernel="precomputed"))``, on synthetic clusters and real MNIST digits."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from sklearn.multiclass import OneVsRestClassifier
from sklearn.svm import SVC

from lightning_afterkernel.errors import DataError, NotSeparableError, SolverError
from lightning_afterkernel.svm import HardMarginSVM, SoftMarginSVM, thundersvm_backend, torch_backend

LABELS = (-3, 2, 7, 11)


@pytest.fixture(scope="module")
def clusters(multiclass):
    X, y, X_test, y_test = multiclass(240, labels=LABELS)
    return X @ X.T, y, X_test @ X.T, y_test


def _line_with_a_middle_class(labels=(0, 1, 2)) -> tuple[np.ndarray, np.ndarray]:
    """Features (x, 1) with x in [-3, -2], [-0.5, 0.5], [2, 3] per class: the middle class is not separable from
    the rest (its region lies between theirs on a line); the outer two are. K has rank 2."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-3, -2, 30), rng.uniform(-0.5, 0.5, 30), rng.uniform(2, 3, 30)])
    X = np.stack([x, np.ones_like(x)], axis=1)
    return X @ X.T, np.repeat(np.asarray(labels), 30)


@pytest.fixture(scope="module")
def mnist(shared_data) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The first 300 official MNIST training images (all ten digits) for training, the next 300 for testing."""
    from lightning_afterkernel.data.sources import read_idx

    raw = shared_data / "mnist" / "MNIST" / "raw"
    X = read_idx(raw / "train-images-idx3-ubyte.gz")[:600].reshape(600, -1) / 255.0
    y = read_idx(raw / "train-labels-idx1-ubyte.gz")[:600].astype(np.int64)
    return X[:300], y[:300], X[300:], y[300:]


def _rbf(A: np.ndarray, B: np.ndarray, gamma: float) -> np.ndarray:
    sq = (A**2).sum(axis=1)[:, None] + (B**2).sum(axis=1)[None, :] - 2.0 * A @ B.T
    return np.exp(-gamma * sq)


def test_one_vs_rest_attributes_and_predictions(clusters):
    K, y, K_test, y_test = clusters
    est = HardMarginSVM().fit(K, y)
    k, n = len(LABELS), len(y)
    np.testing.assert_array_equal(est.classes_, sorted(LABELS))
    assert len(est.estimators_) == k
    Y = np.stack([np.where(y == label, 1.0, -1.0) for label in est.classes_])
    assert est.alpha_.shape == (k, n)
    np.testing.assert_array_equal(est.support_, np.flatnonzero((est.alpha_ > 0).any(axis=0)))
    assert isinstance(est.n_support_, int) and est.n_support_ == est.support_.size
    np.testing.assert_array_equal(est.dual_coef_, (est.alpha_ * Y)[:, est.support_])
    assert est.intercept_.shape == (k,) and not est.intercept_.any()
    assert est.n_iter_.shape == (k,) and est.dual_objective_.shape == (k,) and est.duality_gap_.shape == (k,)
    assert est.min_margin_ == min(e.min_margin_ for e in est.estimators_) >= 1.0 - 1e-6
    assert est.numerical_rank_ == 10 and est.backend_ == ["sklearn+polish"] * k
    assert len(est.solver_info_) == k
    for c, sub in enumerate(est.estimators_):
        np.testing.assert_array_equal(sub.classes_, [0, 1])
        np.testing.assert_array_equal(sub.alpha_, est.alpha_[c])
        assert sub.scale_ == est.scale_ and sub.intercept_ == est.intercept_[c]
    f = est.decision_function(K_test)
    assert f.shape == (len(y_test), k)
    for c, sub in enumerate(est.estimators_):
        np.testing.assert_allclose(f[:, c], sub.decision_function(K_test), rtol=1e-12, atol=1e-12)
    pred = est.predict(K_test)
    np.testing.assert_array_equal(pred, est.classes_[np.argmax(f, axis=1)])
    assert est.score(K_test, y_test) == np.mean(pred == y_test) >= 0.95


@pytest.mark.parametrize("fit_intercept", [False, True])
@pytest.mark.parametrize("backend", ["auto", "torch", "sklearn"])
def test_each_class_is_solved_exactly_as_its_binary_fit(clusters, backend, fit_intercept):
    K, y, _, _ = clusters
    est = HardMarginSVM(backend=backend, fit_intercept=fit_intercept, time_limit=None).fit(K, y)
    for label, sub in zip(est.classes_, est.estimators_, strict=True):
        ref = HardMarginSVM(backend=backend, fit_intercept=fit_intercept, time_limit=None).fit(K, y == label)
        for name in ("alpha_", "intercept_", "min_margin_", "dual_objective_", "numerical_rank_", "backend_"):
            np.testing.assert_array_equal(getattr(sub, name), getattr(ref, name), err_msg=f"class {label}: {name}")


@pytest.mark.parametrize(
    "kernel",
    [
        "clusters",
        pytest.param("mnist-linear", marks=pytest.mark.real_data),
        pytest.param("mnist-rbf", marks=pytest.mark.real_data),
    ],
)
def test_matches_scikit_learn_one_vs_rest(kernel, request):
    """With a bias, each problem is libsvm's SVC at C = 1e10 (a hard margin on separable data): the same classes."""
    if kernel == "clusters":
        K, y, K_test, _ = request.getfixturevalue("clusters")
    else:
        X, y, X_test, _ = request.getfixturevalue("mnist")
        if kernel == "mnist-linear":
            K, K_test = X @ X.T, X_test @ X.T
        else:
            K, K_test = _rbf(X, X, 0.02), _rbf(X_test, X, 0.02)
        assert np.unique(y).size == 10
    est = HardMarginSVM(fit_intercept=True, normalize=False).fit(K, y)
    ref = OneVsRestClassifier(SVC(kernel="precomputed", C=1e10)).fit(K, y)
    np.testing.assert_array_equal(est.classes_, ref.classes_)
    f, f_ref = est.decision_function(K_test), ref.decision_function(K_test)
    np.testing.assert_allclose(f, f_ref, atol=1e-2 * np.abs(f_ref).max())
    assert np.mean(est.predict(K_test) == ref.predict(K_test)) >= 0.99


def test_a_class_that_is_not_separable_is_named():
    K, y = _line_with_a_middle_class()
    with pytest.raises(NotSeparableError, match=r"^class 1 vs rest is not separable: .*numerical rank r = 2 < n = 90"):
        HardMarginSVM().fit(K, y)  # by the low-rank certificate, before any solve
    with pytest.raises(NotSeparableError, match=r"^class 1 vs rest is not separable: .*interior-point iterations"):
        HardMarginSVM(rank_tol=None).fit(K, y)  # by the solver of that class
    K, y = _line_with_a_middle_class(("low", "mid", "high"))
    with pytest.raises(SolverError, match=r"^class 'mid' vs rest is not separable"):
        HardMarginSVM().fit(K, y)


def test_every_class_the_checks_refuse_is_named(multiclass):
    X, y, _, _ = multiclass(240, labels=LABELS)
    i = int(np.flatnonzero(y == 2)[0])
    j = int(np.flatnonzero(y == 11)[0])
    X[j] = X[i]  # the same example labelled 2 and 11: neither "2 vs rest" nor "11 vs rest" is separable
    with pytest.raises(
        NotSeparableError, match=r"^class 2 vs rest is not separable: .*identical feature vectors"
    ) as err:
        HardMarginSVM().fit(X @ X.T, y)
    assert "not separable either: class 11 vs rest." in str(err.value) and "class 7" not in str(err.value)


def test_time_limit_bounds_the_whole_fit(clusters, monkeypatch):
    K, y, _, _ = clusters
    limits = []
    solve = torch_backend.fit_dual

    def spy(K, y_pm, fit_intercept, tol, max_iter, time_limit, **options):
        limits.append(time_limit)
        return solve(K, y_pm, fit_intercept, tol, max_iter, time_limit, **options)

    monkeypatch.setattr(torch_backend, "fit_dual", spy)
    HardMarginSVM(backend="torch", time_limit=30.0).fit(K, y)
    assert len(limits) == len(LABELS) and 30.0 > limits[0] and all(np.diff(limits) < 0)
    X = np.random.default_rng(0).standard_normal((600, 700))
    with pytest.raises(SolverError, match=r"^class 0 vs rest has no hard-margin solution: .*time limit"):
        HardMarginSVM(backend="torch", time_limit=1e-3).fit(X @ X.T, np.arange(600) % 3)


def test_soft_margin_one_vs_rest():
    """Per class the binary soft-margin fit; with a bias and no normalisation, libsvm's one-vs-rest SVC itself.
    The middle class, not separable, is the one whose examples sit at the bound C and violate the margin."""
    K, y = _line_with_a_middle_class()
    est = SoftMarginSVM(C=1.0, fit_intercept=True, normalize=False).fit(K, y)
    ref = OneVsRestClassifier(SVC(kernel="precomputed", C=1.0)).fit(K, y)
    np.testing.assert_allclose(est.decision_function(K), ref.decision_function(K), atol=2e-3)
    assert np.mean(est.predict(K) == ref.predict(K)) >= 0.98
    assert est.n_at_bound_.shape == (3,) and est.primal_objective_.shape == (3,) and est.backend_ == "sklearn"
    assert est.estimators_[1].min_margin_ < 0.0 < est.estimators_[0].min_margin_
    assert est.n_at_bound_[1] > max(est.n_at_bound_[0], est.n_at_bound_[2])
    assert est.min_margin_ == est.estimators_[1].min_margin_
    default = SoftMarginSVM(C=1.0).fit(K, y)
    for label, sub in zip(default.classes_, default.estimators_, strict=True):
        np.testing.assert_array_equal(sub.alpha_, SoftMarginSVM(C=1.0).fit(K, y == label).alpha_)


def test_labels_for_three_or_more_classes(clusters):
    K, y, K_test, y_test = clusters
    ref = HardMarginSVM().fit(K, y)
    names = np.array(["ant", "bee", "cat", "dog"])[np.searchsorted(ref.classes_, y)]
    for labels in (names, y.astype(np.float64), torch.as_tensor(y)):
        est = HardMarginSVM().fit(K, labels)
        np.testing.assert_array_equal(est.alpha_, ref.alpha_)
        assert est.classes_.dtype == np.asarray(labels).dtype
    assert est.score(K_test, torch.as_tensor(y_test)) == ref.score(K_test, y_test)
    with pytest.raises(DataError, match=r"some not integers \(0.5\)"):
        HardMarginSVM().fit(K, np.where(y == 2, 0.5, y).astype(np.float64))
    with pytest.raises(DataError, match=r"some not integers \(nan\)"):
        HardMarginSVM().fit(K, np.where(y == 2, np.nan, y))
    with pytest.raises(DataError, match=r"labels \[5\] not among classes_"):
        ref.score(K_test, np.where(y_test == 2, 5, y_test))


def test_two_classes_stay_one_binary_svm(separable):
    est = HardMarginSVM().fit(separable.K, separable.y)
    assert not hasattr(est, "estimators_") and est.dual_coef_.ndim == 1 and isinstance(est.intercept_, float)
    assert est.decision_function(separable.K_test).shape == (len(separable.y_test),)


@pytest.mark.skipif(importlib.util.find_spec("thundersvm") is None, reason="thundersvm-cpu is not installed")
def test_thundersvm_factors_the_kernel_once(multiclass, monkeypatch):
    X, y, X_test, _ = multiclass(90, labels=(0, 1, 2))
    calls = []
    factor = thundersvm_backend.feature_factor
    monkeypatch.setattr(thundersvm_backend, "feature_factor", lambda K: calls.append(K.shape) or factor(K))
    est = HardMarginSVM(backend="thundersvm").fit(X @ X.T, y)
    ref = HardMarginSVM(backend="torch").fit(X @ X.T, y)
    assert calls == [(90, 90)] and est.backend_ == ["thundersvm"] * 3
    assert est.min_margin_ >= 1.0 - 1e-2
    np.testing.assert_array_equal(est.predict(X_test @ X.T), ref.predict(X_test @ X.T))
