"""The interior-point backend ("torch"), its exact polish and the "auto" route: exactness, non-separable data,
shrinking, limits, devices."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from lightning_afterkernel.errors import ConfigurationError, NotSeparableError, SolverError
from lightning_afterkernel.svm import HardMarginSVM, auto_backend, torch_backend


def _normalized(K: np.ndarray) -> np.ndarray:
    return K / np.sqrt(np.diagonal(K)).mean() ** 2


def _brute_force_dual(K: np.ndarray, y: np.ndarray, fit_intercept: bool) -> float:
    """The hard-margin optimum by enumerating support sets S (numpy only; tiny n).

    For each S solve "margins = 1 on S" (K_SS c + b 1 = y_S, and 1^T c = 0 with a bias); a candidate is feasible
    when a_S = y_S c >= 0 and every margin >= 1; then it satisfies the KKT conditions, and its dual objective
    1^T a / 2 (= ||w||^2 / 2) is the optimum. Returns the smallest such objective (they coincide when several
    degenerate S qualify)."""
    n = y.size
    best = np.inf
    for size in range(1, n + 1):
        for S in itertools.combinations(range(n), size):
            S = list(S)
            A = K[np.ix_(S, S)]
            rhs = y[S]
            if fit_intercept:
                A = np.block([[A, np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
                rhs = np.concatenate([rhs, [0.0]])
            if np.linalg.matrix_rank(A) < A.shape[0]:
                continue
            sol = np.linalg.solve(A, rhs)
            c, b = (sol[:-1], sol[-1]) if fit_intercept else (sol, 0.0)
            a = y[S] * c
            margins = y * (K[:, S] @ c + b)
            if (a >= -1e-12).all() and margins.min() >= 1.0 - 1e-9:
                best = min(best, 0.5 * a.sum())
    return best


def _overlapping(n: int, d: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes in d dimensions with n > 2 d: not separable, no duplicates, rank d."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((n, d)) + 0.05 * (2 * y - 1)[:, None]
    return X @ X.T, y


def _rbf_hard(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable but hard: an RBF kernel with a wide bandwidth and 10% flipped labels (many support vectors)."""
    rng = np.random.default_rng(seed)
    X = rng.random((n, 50))
    sq = (X**2).sum(axis=1)
    K = np.exp(-0.05 * (sq[:, None] + sq[None, :] - 2.0 * X @ X.T))
    y = (X @ rng.standard_normal(50) > 0).astype(int)
    flip = rng.random(n) < 0.1
    y[flip] = 1 - y[flip]
    return K, y


@pytest.mark.parametrize("fit_intercept", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ipm_matches_a_brute_force_reference(fit_intercept, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((10, 3))
    y = np.where(X @ np.array([1.0, -0.5, 0.2]) + 0.3 > 0, 1.0, -1.0)
    if np.unique(y).size < 2:
        y[0] = -y[0]
    X += 0.5 * y[:, None] * np.array([1.0, -0.5, 0.2])  # widen the margin a little
    K = _normalized(X @ X.T)
    try:
        result = torch_backend.fit_dual(K, y, fit_intercept, 1e-9, None, None)
    except NotSeparableError:
        assert _brute_force_dual(K, y, fit_intercept) == np.inf
        return
    a = result.alpha
    f = K @ (a * y) + result.intercept
    dual = a.sum() - 0.5 * (a * y) @ (f - result.intercept)
    assert dual == pytest.approx(_brute_force_dual(K, y, fit_intercept), rel=1e-9)
    assert (a >= 0).all() and (y * f).min() >= 1.0 - 1e-9


DEVICES = [None, pytest.param("cuda", marks=pytest.mark.gpu)]
"""``device=`` of the interior-point fits: None (the CPU) and, on a GPU only, "cuda"."""


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fit_intercept", [False, True])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_exact_kkt_and_at_least_libsvm_dual(separable, fit_intercept, backend, device):
    p = separable
    est = HardMarginSVM(backend=backend, fit_intercept=fit_intercept, device=device).fit(p.K, p.y)
    if device is not None:
        assert est.backend_ == "torch"  # auto on a GPU: the interior-point method there
    ref = HardMarginSVM(backend="sklearn", fit_intercept=fit_intercept).fit(p.K, p.y)
    Kn, y = p.K / est.scale_, 2.0 * p.y - 1.0
    a = est.alpha_
    margins = y * (Kn @ (a * y) + est.intercept_)
    assert (a >= 0).all() and margins.min() >= 1.0 - 1e-9
    assert np.abs(a * (margins - 1.0)).max() <= 1e-9 * a.max()  # complementary slackness
    if fit_intercept:
        assert abs(y @ a) <= 1e-9 * a.sum()
    assert est.dual_objective_ >= ref.dual_objective_
    assert est.duality_gap_ < 1e-9 < ref.duality_gap_
    np.testing.assert_array_equal(est.predict(p.K_test), ref.predict(p.K_test))


def test_hard_kernel_exact_where_libsvm_falls_short():
    K, y = _rbf_hard(800)
    smo = HardMarginSVM(backend="sklearn").fit(K, y)
    assert smo.min_margin_ < 1.0 - 1e-4  # libsvm's float32 kernel cache
    for backend in ("torch", "auto"):
        est = HardMarginSVM(backend=backend).fit(K, y)
        assert est.min_margin_ >= 1.0 - 1e-9
        assert est.dual_objective_ >= smo.dual_objective_
        assert est.n_support_ > 100


@pytest.mark.parametrize("device", DEVICES)
def test_non_separable_data_is_detected_by_the_ipm(device):
    K, y = _overlapping(600)
    y_pm = 2.0 * y - 1.0
    for fit_intercept in (False, True):
        start = time.perf_counter()
        with pytest.raises(NotSeparableError, match="geometric margin <= .* times the mean feature norm") as info:
            torch_backend.fit_dual(_normalized(K), y_pm, fit_intercept, 1e-9, None, None, device=device)
        assert time.perf_counter() - start < 10.0
        assert info.value.best_margin is not None and info.value.best_margin < 0.05
    with pytest.raises(NotSeparableError):
        HardMarginSVM(backend="torch", rank_tol=None, device=device).fit(K, y)


@pytest.mark.parametrize("device", DEVICES)
def test_opposite_label_duplicates_at_n_2000_within_10_s_without_the_precheck(device):
    """The interior-point certificate alone (the estimator's pre-check would catch this first)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2000, 100))
    y = np.where(X[:, 0] > 0, 1.0, -1.0)
    X[1000] = X[7]
    y[1000] = -y[7]
    start = time.perf_counter()
    with pytest.raises(NotSeparableError, match="not separable"):
        torch_backend.fit_dual(_normalized(X @ X.T), y, False, 1e-9, None, 60.0, device=device)
    assert time.perf_counter() - start < 10.0


@pytest.mark.parametrize("backend", ["auto", "torch", "sklearn", "thundersvm", "cuml"])
def test_every_backend_refuses_opposite_label_duplicates_within_10_s(backend):
    try:
        HardMarginSVM(backend=backend).check_params()
    except ConfigurationError as err:
        pytest.skip(str(err))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2000, 50))
    y = rng.integers(0, 2, 2000)
    X[1000] = X[7]
    y[7], y[1000] = 1, 0
    start = time.perf_counter()
    with pytest.raises(NotSeparableError, match="examples 7 and 1000"):
        HardMarginSVM(backend=backend).fit(X @ X.T, y)
    assert time.perf_counter() - start < 10.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fit_intercept", [False, True])
def test_shrinking_gives_the_same_solution(fit_intercept, device):
    K, y = _rbf_hard(600, seed=1)
    Kn, y_pm = _normalized(K), 2.0 * y - 1.0
    full = torch_backend.fit_dual(Kn, y_pm, fit_intercept, 1e-9, None, None, shrinking=False, device=device)
    shrunk = torch_backend.fit_dual(Kn, y_pm, fit_intercept, 1e-9, None, None, shrinking=True, device=device)
    assert full.info["n_active"] == 600 and shrunk.info["n_active"] < 600
    np.testing.assert_allclose(shrunk.alpha, full.alpha, rtol=1e-6, atol=1e-9 * full.alpha.max())
    assert shrunk.intercept == pytest.approx(full.intercept, abs=1e-7)


def test_working_set_grows_until_every_margin_holds(separable):
    """Started on a few examples, the IPM adds the violators of the rest until all margins are >= 1."""
    Kn, y = _normalized(separable.K), 2.0 * separable.y - 1.0
    ref = torch_backend.fit_dual(Kn, y, False, 1e-9, None, None)
    grown = torch_backend.fit_dual(Kn, y, False, 1e-9, None, None, shrinking=False, working_set=np.arange(20))
    assert grown.info["n_active"] > 20
    np.testing.assert_allclose(grown.alpha, ref.alpha, atol=1e-8 * ref.alpha.max())


def test_polish_recovers_from_a_wrong_support_guess(separable):
    Kn, y = _normalized(separable.K), 2.0 * separable.y - 1.0
    ref = torch_backend.fit_dual(Kn, y, True, 1e-9, None, None)
    support = np.flatnonzero(ref.alpha)
    wrong = np.concatenate([support[1:], [int(np.argmax(np.abs(Kn @ (ref.alpha * y))))]])  # one lost, one spurious
    out = torch_backend.polish(Kn, y, True, wrong)
    assert out is not None and out.n_iter >= 2
    np.testing.assert_allclose(out.alpha, ref.alpha, atol=1e-9 * ref.alpha.max())
    assert torch_backend.polish(Kn, y, True, support[:1]) is None  # one class only: no biased solution


def test_auto_routes(monkeypatch, separable):
    p = separable
    assert HardMarginSVM().fit(p.K, p.y).backend_ == "sklearn+polish"
    monkeypatch.setattr(torch_backend, "polish", lambda *args, **kwargs: None)
    est = HardMarginSVM().fit(p.K, p.y)
    assert est.backend_ == "sklearn+torch" and est.min_margin_ >= 1.0 - 1e-9
    monkeypatch.setattr(auto_backend, "smo_budget", lambda n: 1e-6)  # libsvm "times out": the IPM decides
    est = HardMarginSVM().fit(p.K, p.y)
    assert est.backend_ == "torch" and est.min_margin_ >= 1.0 - 1e-9


def test_auto_detects_non_separable_full_rank_data_after_the_smo_budget(monkeypatch):
    monkeypatch.setattr(auto_backend, "SMO_SECONDS", 0.5)
    K, y = _overlapping(400)
    start = time.perf_counter()
    with pytest.raises(NotSeparableError, match="interior-point"):
        HardMarginSVM(rank_tol=None).fit(K, y)
    assert time.perf_counter() - start < 10.0


def test_regularised_cholesky_retry():
    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.standard_normal((50, 5)))
    K = X @ X.T  # rank 5: K + 0 is singular
    factor = torch_backend._Factor(K, torch.zeros(50, dtype=torch.float64), 1.0)
    assert factor.delta > 0.0
    rhs = K @ torch.ones(50, 1, dtype=torch.float64)
    assert torch.allclose(K @ factor.solve(rhs), rhs, atol=1e-4)
    with pytest.raises(SolverError, match="far from positive semi-definite"):
        torch_backend._Factor(-torch.eye(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), 1.0)


def test_low_rank_separable_kernel_needs_the_regularisation(exact_no_bias_w):
    """More examples on the margin than features: K + D is singular on the support set near the end."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 4))
    y = np.where(X[:, 0] > 0, 1.0, -1.0)
    X[:, 0] += 0.3 * y
    est = HardMarginSVM(backend="torch", rank_tol=None).fit(X @ X.T, y)
    w = exact_no_bias_w(X, y)
    assert est.dual_objective_ == pytest.approx(0.5 * est.scale_ * w @ w, rel=1e-8)


def test_limits():
    K, y = _rbf_hard(400)
    with pytest.raises(SolverError, match="did not converge in max_iter=3"):
        HardMarginSVM(backend="torch", max_iter=3).fit(K, y)
    with pytest.raises(SolverError, match="interior-point method hit the time limit"):
        torch_backend.fit_dual(_normalized(K), 2.0 * y - 1.0, False, 1e-9, None, 1e-9)


def test_torch_tensors_and_the_device_parameter(separable):
    p = separable
    ref = HardMarginSVM(backend="torch").fit(p.K, p.y)
    est = HardMarginSVM(backend="torch", device="cpu").fit(torch.from_numpy(p.K), torch.from_numpy(p.y))
    np.testing.assert_allclose(est.alpha_, ref.alpha_, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fit_intercept", [False, True])
def test_cuda_matches_cpu(fit_intercept):
    K, y = _rbf_hard(1000)
    cpu = HardMarginSVM(backend="torch", fit_intercept=fit_intercept).fit(K, y)
    for est in (
        HardMarginSVM(backend="torch", device="cuda", fit_intercept=fit_intercept).fit(K, y),
        HardMarginSVM(fit_intercept=fit_intercept).fit(torch.from_numpy(K).cuda(), y),  # auto: IPM on the K's device
    ):
        assert est.backend_ == "torch" and est.min_margin_ >= 1.0 - 1e-9
        assert est.dual_objective_ == pytest.approx(cpu.dual_objective_, rel=1e-9)


@pytest.mark.parametrize("m", [5, 130, 700])  # fewer rows than one chunk, several chunks, the dense branch
def test_sparse_product_equals_the_dense_product(m):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2000, 30))
    buffer = np.empty((2002, 2002))
    K = buffer[:2000, :2000]  # a view with row stride n + 2, as the estimator's padded copy
    K[...] = X @ X.T
    Kt = torch.from_numpy(K)
    idx = torch.from_numpy(np.sort(rng.choice(2000, m, replace=False)))
    c = torch.from_numpy(rng.standard_normal(m))
    dense = torch.zeros(2000, dtype=torch.float64)
    dense[idx] = c
    expected = Kt @ dense
    got = torch_backend.sparse_product(Kt, idx, c)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
