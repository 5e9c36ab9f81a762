"""The interior-point backend ("torch"), its exact polish and the "auto" route: exactness, non-separable data,
shrinking, limits, devices."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from sklearn.svm import SVC

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


def _rbf_hard(n: int, seed: int = 0, gamma: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Separable but hard: an RBF kernel with a wide bandwidth and 10% flipped labels (many support vectors)."""
    rng = np.random.default_rng(seed)
    X = rng.random((n, 50))
    sq = (X**2).sum(axis=1)
    K = np.exp(-gamma * (sq[:, None] + sq[None, :] - 2.0 * X @ X.T))
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


def _certified_gap(K: np.ndarray, y: np.ndarray, alpha: np.ndarray, b: float, fit_intercept: bool) -> float:
    """Relative duality gap (P - D) / P of (alpha, b), computed here from scratch: D = 1^T a - ||w||^2 / 2 is a
    lower bound on the optimum when a >= 0 (and y^T a = 0), P = ||w||^2 / (2 m_min^2) the objective of the
    feasible primal point (w, b) / m_min. Checks a >= 0 and y^T a ~ 0 on the way."""
    assert (alpha >= 0).all()
    if fit_intercept:
        assert abs(y @ alpha) <= 1e-9 * alpha.sum()
    f = K @ (alpha * y)
    w_sq = (alpha * y) @ f
    m_min = (y * (f + b)).min()
    assert m_min > 0
    primal = 0.5 * w_sq / m_min**2
    return (primal - (alpha.sum() - 0.5 * w_sq)) / primal


@pytest.mark.parametrize("fit_intercept", [False, True])
@pytest.mark.parametrize("eps", [3e-4, 1e-4])
def test_large_alphas_from_a_near_duplicate_pair(exact_no_bias_w, near_duplicate_pair, eps, fit_intercept):
    """1^T alpha = ||w||^2 ~ 1e8-7e8: float64 resolves the margins only to ~1e-8-1e-7, above the old fixed stopping
    tolerance 1e-9, and the iteration used to step onto a_i = 0 (ZeroDivisionError or a false "far from PSD")."""
    X, y = near_duplicate_pair(eps)
    est = HardMarginSVM(backend="torch", fit_intercept=fit_intercept).fit(X @ X.T, y)
    y_pm, Xn = 2.0 * y - 1.0, X / np.sqrt(est.scale_)
    assert est.min_margin_ >= 1.0 - 1e-6 and est.duality_gap_ < 1e-6
    # Reference: least-distance programming (NNLS) on the explicit features; with a bias on [x, 100], whose weight
    # w_101 = b / 100 adds (b / 100)^2 ~ 4 to ||w||^2 ~ 1e8 (it is exact as the constant grows, less accurate).
    Z = Xn if not fit_intercept else np.hstack([Xn, np.full((100, 1), 100.0)])
    w = exact_no_bias_w(Z, y_pm)
    w_sq, b_ref = (w @ w, 0.0) if not fit_intercept else (w[:-1] @ w[:-1], 100.0 * w[-1])
    assert w_sq > 5e7
    assert 2.0 * est.dual_objective_ == pytest.approx(w_sq, rel=1e-6)
    assert est.intercept_ == pytest.approx(b_ref, rel=1e-5, abs=1e-9)
    assert _certified_gap(Xn @ Xn.T, y_pm, est.alpha_, est.intercept_, fit_intercept) < 1e-6


@pytest.mark.parametrize("fit_intercept", [False, True])
def test_hard_rbf_kernel_with_large_alphas(exact_no_bias_w, fit_intercept):
    """The notes' hard separable RBF kernel (gamma 0.002, 10% flipped labels; 1^T alpha ~ 1.6e6) used to fail with
    a bias ("could not factor K + D ... far from positive semi-definite", from NaN iterates)."""
    K, y = _rbf_hard(400, gamma=0.002)
    y_pm = 2.0 * y - 1.0
    est = HardMarginSVM(backend="torch", fit_intercept=fit_intercept).fit(K, y)
    assert est.alpha_.sum() > 1e6 and est.min_margin_ >= 1.0 - 1e-8
    assert _certified_gap(K / est.scale_, y_pm, est.alpha_, est.intercept_, fit_intercept) < 1e-7
    if fit_intercept:  # reference: libsvm with C above every alpha, exact up to its float32 kernel cache
        ref = SVC(kernel="precomputed", C=1e10, tol=1e-6).fit(K / est.scale_, y)
        a_ref = np.zeros(400)
        a_ref[ref.support_] = np.abs(ref.dual_coef_[0])
        dual_ref = a_ref.sum() - 0.5 * (a_ref * y_pm) @ ((K / est.scale_) @ (a_ref * y_pm))
        assert dual_ref <= est.dual_objective_ and est.dual_objective_ == pytest.approx(dual_ref, rel=1e-4)
    else:  # reference: least-distance programming (NNLS) on explicit features of K
        lam, V = np.linalg.eigh(K / est.scale_)
        w = exact_no_bias_w(V * np.sqrt(np.clip(lam, 0.0, None)), y_pm)
        assert 2.0 * est.dual_objective_ == pytest.approx(w @ w, rel=1e-7)


def test_a_stalled_iteration_ends_in_a_verified_point_or_a_solver_error(monkeypatch, near_duplicate_pair):
    """With the old, unreachable residual tolerance (1e-9 whatever the rounding), the iteration goes on until it can
    not: its last point is returned when it verifies, otherwise SolverError says why; never an arithmetic error."""
    monkeypatch.setattr(torch_backend, "ROUNDING", 0.0)
    K, y = _rbf_hard(400, gamma=0.002)
    y_pm = 2.0 * y - 1.0
    Kn = _normalized(K)
    result = torch_backend.fit_dual(Kn, y_pm, True, 1e-9, None, None)  # used to end in NaN iterates
    assert result.n_iter > 30  # it ran past the point where the reachable tolerance stops it
    assert _certified_gap(Kn, y_pm, result.alpha, result.intercept, True) < 1e-7
    X, y = near_duplicate_pair(3e-4)
    with pytest.raises(SolverError, match=r"stalled after \d+ iterations .* not a verified hard margin"):
        torch_backend.fit_dual(_normalized(X @ X.T), 2.0 * y - 1.0, True, 1e-9, None, None)  # ZeroDivisionError
    with pytest.raises(SolverError, match="complementarity"):  # the guard itself
        torch_backend._mehrotra_direction(
            torch.eye(3, dtype=torch.float64),
            torch.ones(3, dtype=torch.float64),
            torch.zeros(3, dtype=torch.float64),
            torch.ones(3, dtype=torch.float64),
            torch.zeros(3, dtype=torch.float64),
            0.0,
            False,
            1.0,
        )


@pytest.mark.parametrize("kind", ["linear", "rbf"])
def test_the_kernel_scale_does_not_matter_without_normalisation(exact_no_bias_w, kind):
    """normalize=False used to fail on large scales (linear x1e9: no convergence in 200 iterations; RBF x1e12: "far
    from positive semi-definite"). Now every scale takes the iterations of the normalised problem and gives its
    classifier."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((80, 10))
    y = (X @ rng.standard_normal(10) > 0).astype(int)
    sq = (X**2).sum(axis=1)
    K = X @ X.T if kind == "linear" else np.exp(-0.1 * (sq[:, None] + sq[None, :] - 2.0 * X @ X.T))
    ref = HardMarginSVM(backend="torch", rank_tol=None).fit(K, y)
    for c in (1e-6, 1.0, 1e8, 1e9, 1e12):
        est = HardMarginSVM(backend="torch", normalize=False, rank_tol=None).fit(c * K, y)
        assert est.n_iter_ == ref.n_iter_
        np.testing.assert_allclose(est.decision_function(c * K), ref.decision_function(K), rtol=1e-9, atol=1e-9)
        assert est.dual_objective_ * c == pytest.approx(ref.dual_objective_ / ref.scale_, rel=1e-9)
    if kind == "linear":  # and the classifier is the exact one
        w = exact_no_bias_w(X, 2.0 * y - 1.0)
        np.testing.assert_allclose(ref.decision_function(K), X @ w, rtol=1e-7, atol=1e-7)


def test_duplicated_support_vectors_do_not_inflate_the_support(monkeypatch, exact_no_bias_w):
    """30 examples duplicated with the same label make K_SS singular: the polish used to give up and the interior
    point came back with alphas ~1e-13 on every example (n_support_ 141-180 of 180 instead of ~110-136)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((150, 200))
    y = (X[:, :5].sum(axis=1) > 0).astype(int)
    X, y = np.vstack([X, X[:30]]), np.concatenate([y, y[:30]])
    w = exact_no_bias_w(X[:150], 2.0 * y[:150] - 1.0)  # the duplicates change nothing
    margins = (2.0 * y - 1.0) * (X @ w)
    on_margin = np.abs(margins - 1.0) <= 1e-6
    distinct = np.unique(np.flatnonzero(on_margin) % 150).size
    for crossover in (True, False):
        if not crossover:  # the fallback: the interior point with the alphas clearly off the support set to 0
            monkeypatch.setattr(torch_backend, "_polish", lambda *args: None)
        for backend in ("torch", "auto"):
            est = HardMarginSVM(backend=backend, shrinking=crossover).fit(X @ X.T, y)
            assert on_margin[est.support_].all()  # every support vector is on the margin
            assert distinct <= est.n_support_ <= on_margin.sum()
            assert est.alpha_[est.support_].min() > 1e-6 * est.alpha_.max()
            tol = 1e-9 if crossover else 1e-6  # the interior point is optimal to tol = 1e-9 in the objective
            np.testing.assert_allclose(est.decision_function(X @ X.T), X @ w, rtol=tol, atol=tol)
