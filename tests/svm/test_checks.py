"""Every input error path: malformed kernels, labels, cross kernels, hyper-parameters and backends."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from lightning_afterkernel.errors import ConfigurationError, DataError, KernelError
from lightning_afterkernel.svm import HardMarginSVM, available_backends
from lightning_afterkernel.svm._checks import check_kernel, warn_if_indefinite


def test_non_square_kernel(separable):
    with pytest.raises(KernelError, match=r"square .*shape \(300, 299\)"):
        HardMarginSVM().fit(separable.K[:, :-1], separable.y)
    with pytest.raises(KernelError, match="square"):
        HardMarginSVM().fit(np.ones(5), np.array([0, 1, 0, 1, 0]))


def test_non_finite_kernel_reports_the_count(separable):
    K = separable.K.copy()
    K[0, 5] = np.nan
    K[3, 3] = np.inf
    K[7, 2] = -np.inf
    with pytest.raises(KernelError, match="K contains 3 non-finite entries"):
        HardMarginSVM().fit(K, separable.y)


def test_asymmetric_kernel_reports_the_asymmetry(separable):
    K = separable.K.copy()
    K[0, 1] += 0.5 * np.abs(K).max()
    with pytest.raises(KernelError, match=r"not symmetric: max \|K_ij - K_ji\|"):
        HardMarginSVM().fit(K, separable.y)


def test_small_asymmetry_is_symmetrised(separable):
    K = separable.K.copy()
    K[0, 1] += 1e-6 * np.abs(K).max()
    out = check_kernel(K)
    np.testing.assert_array_equal(out, out.T)
    assert out[0, 1] == pytest.approx(0.5 * (K[0, 1] + K[1, 0]))


@pytest.mark.parametrize(
    ("diag", "match"),
    [
        ([1.0, -1.0, 1.0, 1.0], r"1 negative diagonal entries \(e.g. K\[1, 1\] = -1\)"),
        ([0.0] * 4, "no positive diagonal"),
    ],
    ids=["negative", "zero"],
)
def test_bad_diagonal(diag, match):
    K = np.diag(diag)
    K[0, 1] = K[1, 0] = 0.1
    with pytest.raises(KernelError, match=match):
        HardMarginSVM().fit(K, np.array([0, 1, 0, 1]))


def test_non_numeric_kernel():
    with pytest.raises(KernelError, match="real numeric"):
        HardMarginSVM().fit(np.array([["a", "b"], ["b", "a"]]), np.array([0, 1]))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (lambda y: y + 1, r"binary labels in \{0, 1\}, \{-1, 1\} or bool; found 1, 2"),
        (lambda y: np.where(y == 1, "cat", "ship"), "dtype <U"),
        (lambda y: y[:-1], "y has 299 labels but K is 300 x 300"),
        (lambda y: y[:, None], r"1-D .*shape \(300, 1\)"),
        (lambda y: np.zeros_like(y), "single class"),
        (lambda y: np.where(y == 1, np.nan, 0.0), "binary labels"),
    ],
    ids=["one-two", "strings", "length", "2d", "one-class", "nan"],
)
def test_bad_labels(separable, labels, match):
    with pytest.raises(DataError, match=match):
        HardMarginSVM().fit(separable.K, labels(separable.y))


def test_bad_cross_kernels(separable):
    est = HardMarginSVM().fit(separable.K, separable.y)
    with pytest.raises(KernelError, match=r"K_cross must have n_train columns .* = 300; got shape \(200, 299\)"):
        est.decision_function(separable.K_test[:, :-1])
    with pytest.raises(KernelError, match="2-D"):
        est.predict(separable.K_test[0])
    K_test = separable.K_test.copy()
    K_test[4, 4] = np.nan
    with pytest.raises(KernelError, match="K_cross contains 1 non-finite"):
        est.predict(K_test)


def test_unknown_backend(separable):
    valid = "'auto', 'torch', 'sklearn', 'cuml', 'thundersvm'"
    with pytest.raises(ConfigurationError, match=f"unknown backend='libsvm'; valid backends: {valid}"):
        HardMarginSVM(backend="libsvm").fit(separable.K, separable.y)


def test_missing_optional_backends_name_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "thundersvm", None)  # import thundersvm -> ImportError
    monkeypatch.setitem(sys.modules, "cuml", None)
    with pytest.raises(ConfigurationError, match=r"needs the thundersvm-cpu package: pip install"):
        HardMarginSVM(backend="thundersvm").check_params()
    with pytest.raises(ConfigurationError, match=r"needs RAPIDS cuML >= 26.02 .*pip install"):
        HardMarginSVM(backend="cuml").check_params()
    assert "thundersvm" not in available_backends() and "cuml" not in available_backends()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message shown without CUDA")
def test_cuda_device_without_cuda(separable):
    with pytest.raises(ConfigurationError, match="device='cuda' needs CUDA, which is not available"):
        HardMarginSVM(device="cuda").fit(separable.K, separable.y)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"device": "gpu0"}, "device='gpu0' is not a torch device"),
        ({"backend": "sklearn", "device": "cpu"}, "applies to the interior-point backends 'auto' and 'torch' only"),
        ({"shrinking": "yes"}, "shrinking must be True or False"),
    ],
)
def test_bad_device_options(params, match):
    with pytest.raises(ConfigurationError, match=match):
        HardMarginSVM(**params).check_params()


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"tol": 0.0}, "tol must be a positive"),
        ({"tol": float("nan")}, "tol must be a positive"),
        ({"max_iter": 0}, "max_iter must be a positive int"),
        ({"max_iter": 2.5}, "max_iter must be a positive int"),
        ({"time_limit": -1.0}, "time_limit must be a positive"),
        ({"margin_tol": 1.0}, r"margin_tol must be in \[0, 1\)"),
        ({"fit_intercept": "yes"}, "fit_intercept must be True or False"),
        ({"normalize": None}, "normalize must be True or False"),
    ],
)
def test_bad_hyper_parameters(separable, params, match):
    with pytest.raises(ConfigurationError, match=match):
        HardMarginSVM(**params).fit(separable.K, separable.y)


def test_indefinite_kernel_warns():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 5))
    v = rng.standard_normal(50)
    K = X @ X.T - 1e-3 * np.outer(v, v)  # eigenvalue ~ -0.05 against lambda_max ~ 100
    with pytest.warns(UserWarning, match="not positive semi-definite"):
        warn_if_indefinite(K)


def test_psd_kernels_do_not_warn():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 20))  # rank 20: 2,980 zero eigenvalues; checked on a 1,000 subset
    K = (X @ X.T).astype(np.float32).astype(np.float64)  # float32 rounding noise is not a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_indefinite(K)


@pytest.mark.parametrize("pad", [0, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exactly_symmetric_fast_path_matches_the_general_path(monkeypatch, pad, dtype):
    from lightning_afterkernel.svm import _checks

    rng = np.random.default_rng(0)
    X = rng.standard_normal((700, 30))
    upper = np.triu(X @ X.T)
    K = (upper + np.triu(upper, 1).T).astype(dtype)  # mirrored: exactly symmetric, as empirical_ntk's kernels
    K.flags.writeable = False  # e.g. np.load(mmap_mode="r"): read, never written
    assert _checks._exactly_symmetric(torch.from_numpy(K.copy()), block=128)
    fast, s_fast = _checks.check_and_normalize_kernel(K, pad=pad)
    monkeypatch.setattr(_checks, "_exactly_symmetric", lambda src, block=512: False)
    slow, s_slow = _checks.check_and_normalize_kernel(K, pad=pad)
    assert s_fast == s_slow == pytest.approx(np.sqrt(np.diagonal(K).astype(np.float64)).mean() ** 2)
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_allclose(fast, K.astype(np.float64) / s_fast, rtol=1e-15)
    assert fast.dtype == np.float64 and fast.shape == K.shape
    if pad:
        assert fast.base.shape == (702, 702)


def test_one_asymmetric_entry_is_found_and_averaged():
    from lightning_afterkernel.svm import _checks

    K = np.eye(1100, dtype=np.float32) * 2.0
    K[1050, 3] = 1e-5  # past the first 512 x 512 block pair
    assert not _checks._exactly_symmetric(torch.from_numpy(K))
    out = check_kernel(K)
    assert out[1050, 3] == out[3, 1050] == pytest.approx(0.5e-5)


def test_symmetric_infinities_are_counted():
    K = np.eye(20)
    K[2, 5] = K[5, 2] = np.inf
    with pytest.raises(KernelError, match="K contains 2 non-finite entries"):
        check_kernel(K)


def test_indefinite_check_leaves_the_kernel_unchanged():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((100, 5))  # below PSD_MIN_SIZE: the whole kernel is checked
    K = X @ X.T
    before = K.copy()
    warn_if_indefinite(K)
    np.testing.assert_array_equal(K, before)


def test_a_field_of_a_record_array_is_read():
    """Strides that are not a multiple of the item size (numpy can, torch cannot share them)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 3))
    records = np.zeros((40, 40), dtype=[("k", np.float64), ("w", np.float32)])
    records["k"] = X @ X.T
    np.testing.assert_array_equal(check_kernel(records["k"]), check_kernel(X @ X.T))
