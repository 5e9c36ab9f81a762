"""The low-rank separability certificate: pivoted Cholesky, the LP, and HardMarginSVM's use of them."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lightning_afterkernel.errors import ConfigurationError, NotSeparableError
from lightning_afterkernel.svm import HardMarginSVM, lowrank
from lightning_afterkernel.svm.lowrank import certify_separability, pivoted_cholesky


def _relu_features(n: int, d: int, seed: int = 0) -> np.ndarray:
    """float32 ReLU features of a random 2-layer net on uniform 'pixels', like the MLP's conjugate kernel."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 784), dtype=np.float32)
    h = np.maximum(x @ rng.uniform(-1, 1, (784, d)).astype(np.float32) * np.float32(np.sqrt(6 / 878)), 0)
    return np.maximum(h @ rng.uniform(-1, 1, (d, d)).astype(np.float32) * np.float32(np.sqrt(3 / d)), 0)


def _separable_low_rank(n: int, d: int, seed: int = 0, gap: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features, labels sign(x . w) with examples within ``gap`` std of the hyperplane dropped."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    s = X @ rng.standard_normal(d)
    keep = np.abs(s) > gap * s.std()
    return X[keep], (s[keep] > 0).astype(int)


def _ray_pairs(n_pairs: int = 200, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Negatives z with z_0 in [0.5, 1] and positives 2.5 z on the same rays: threshold z_0 > 1.1 separates
    them with a bias, while no hyperplane through the origin can (w . z < 0 < w . 2.5 z is impossible)."""
    rng = np.random.default_rng(seed)
    Z = 0.3 * rng.standard_normal((n_pairs, d))
    Z[:, 0] = rng.uniform(0.5, 1.0, n_pairs)
    X = np.vstack([Z, 2.5 * Z])
    y = np.repeat([0, 1], n_pairs)
    return X, y


def test_ck_like_kernel_is_refused_within_seconds():
    """The quickstart's failure: n = 1,000 ReLU features of width 94, labels that no hyperplane separates."""
    phi = _relu_features(1000, 94)
    K = phi @ phi.T  # float32, as conjugate_kernel computes it
    y = np.random.default_rng(1).integers(0, 2, 1000)
    for fit_intercept in (False, True):
        start = time.perf_counter()
        with pytest.raises(NotSeparableError, match=r"numerical rank r = \d+ < n = 1000") as info:
            HardMarginSVM(fit_intercept=fit_intercept).fit(K, y)
        assert time.perf_counter() - start < 3.0
        message = str(info.value)
        assert "no direction in its span separates the data" in message and "SoftMarginSVM" in message
        assert ("with a bias" in message) == fit_intercept
        assert info.value.best_margin is None


def test_certificate_bounds_the_margin_of_every_separator():
    """The raised bound is sqrt(z^T K z) for the LP's convex combination: ~0 here (float32 rounding)."""
    phi = _relu_features(600, 40, seed=2)
    K = (phi @ phi.T).astype(np.float64)
    y = np.where(np.random.default_rng(3).random(600) < 0.5, -1.0, 1.0)
    with pytest.raises(NotSeparableError, match=r"geometric margin <= (\S+) times the largest") as info:
        certify_separability(K, y, False, 1e-5)
    bound = float(str(info.value).split("geometric margin <= ")[1].split(" ")[0])
    assert 0.0 <= bound < 1e-3


def test_separable_low_rank_kernel_passes_and_fits_exactly(exact_no_bias_w):
    X, y = _separable_low_rank(1500, 30)
    est = HardMarginSVM(tol=1e-4).fit(X @ X.T, y)
    assert est.numerical_rank_ == 30
    assert abs(est.min_margin_ - 1.0) <= 1e-9
    y_pm = 2.0 * y - 1.0
    w = exact_no_bias_w(X, y_pm)
    assert est.dual_objective_ == pytest.approx(0.5 * est.scale_ * w @ w, rel=2e-3)
    assert est.score(X @ X.T, y) == 1.0


def test_float32_round_off_is_not_rank():
    """Gaussian features of dimension 40 in a float32 kernel: rank 40 at the default rank_tol, not more."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2000, 40)).astype(np.float32)
    K = (X @ X.T).astype(np.float64)
    L, pivots = pivoted_cholesky(K, lowrank.RANK_TOL, 200)
    assert L.shape == (2000, 40) and np.unique(pivots).size == 40
    assert np.abs(K - L @ L.T).max() < lowrank.RANK_TOL * np.diagonal(K).max()
    K64 = X.astype(np.float64) @ X.astype(np.float64).T
    assert pivoted_cholesky(K64, 1e-12, 200)[0].shape[1] == 40


def test_pivoted_cholesky_gives_up_at_the_cap():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((100, 30))
    assert pivoted_cholesky(X @ X.T, 1e-5, 29) is None
    assert pivoted_cholesky(X @ X.T, 1e-5, 30)[0].shape == (100, 30)


def test_separation_only_along_a_tiny_direction_is_not_trusted():
    """A coordinate eps * y_i separates the data, but with residual eps^2 = 1e-7 of max K_ii: below rank_tol
    (numerically absent) the certificate refuses; with a smaller rank_tol it sees the separation."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 5))
    y = np.where(rng.random(400) < 0.5, -1.0, 1.0)
    eps = np.sqrt(1e-7 * (X**2).sum(axis=1).max())
    Xe = np.hstack([X, eps * y[:, None]])
    K = Xe @ Xe.T
    with pytest.raises(NotSeparableError, match=r"rank r = 5 < n = 400"):
        certify_separability(K, y, False, 1e-5)
    cert = certify_separability(K, y, False, 1e-9)
    assert cert.rank == 6 and cert.separable is True


def test_bias_only_separation():
    X, y = _ray_pairs()
    K = X @ X.T
    with pytest.raises(NotSeparableError, match=r"rank r = 5 < n = 400"):
        HardMarginSVM(fit_intercept=False).fit(K, y)
    est = HardMarginSVM(fit_intercept=True).fit(K, y)
    assert est.numerical_rank_ == 5
    assert abs(est.min_margin_ - 1.0) <= 1e-9
    assert est.score(K, y) == 1.0
    assert est.intercept_ < -1.0  # the threshold z_0 ~ 1.1 needs a real bias


def test_full_rank_kernels_skip_the_certificate_and_fit_as_before():
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((300, 10))
    sq = (Z**2).sum(axis=1)
    K = np.exp(-0.1 * (sq[:, None] + sq[None, :] - 2.0 * Z @ Z.T))
    y = (Z[:, 0] + 0.3 * rng.standard_normal(300) > 0).astype(int)
    est = HardMarginSVM().fit(K, y)
    ref = HardMarginSVM(rank_tol=None).fit(K, y)
    assert est.numerical_rank_ is None and ref.numerical_rank_ is None
    np.testing.assert_array_equal(est.alpha_, ref.alpha_)
    assert abs(est.min_margin_ - 1.0) <= 1e-9


def test_rank_above_the_cap_skips(monkeypatch):
    monkeypatch.setattr(lowrank, "MAX_RANK", 20)
    X, y = _separable_low_rank(600, 30)
    est = HardMarginSVM().fit(X @ X.T, y)
    assert est.numerical_rank_ is None
    assert abs(est.min_margin_ - 1.0) <= 1e-9


def test_working_set_rounds_find_a_late_conflict(monkeypatch):
    """A separable bulk plus a pair p, -p with the same label, p orthogonal to the bulk's separator: either
    point alone is separable with the bulk (the separator tilts), both together are not. With a working set of
    50 examples the first LP misses the pair, and the rounds must add it."""
    monkeypatch.setattr(lowrank, "WORKING_SET", 50)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 10))
    w = rng.standard_normal(10)
    s = X @ w
    keep = np.abs(s) > 0.2 * s.std()
    X, y = X[keep], np.where(s[keep] > 0, 1.0, -1.0)
    u = rng.standard_normal(10)
    u -= (u @ w) / (w @ w) * w
    p = 1.5 * u / np.linalg.norm(u)
    rounds = []
    solve = lowrank._max_margin_lp

    def spy(L, *args):
        out = solve(L, *args)
        rounds.append(out[0])
        return out

    monkeypatch.setattr(lowrank, "_max_margin_lp", spy)
    cert = certify_separability(X @ X.T, y, False, 1e-5)
    assert cert.separable is True and cert.rank == 10 and len(rounds) >= 2
    rounds.clear()
    Xn, yn = np.vstack([X, p, -p]), np.concatenate([y, [1.0, 1.0]])
    with pytest.raises(NotSeparableError, match=f"rank r = 10 < n = {yn.size}"):
        certify_separability(Xn @ Xn.T, yn, False, 1e-5)
    assert rounds[0] > lowrank.LP_TOL and rounds[-1] <= lowrank.LP_TOL


def test_lp_time_budget_leaves_the_decision_to_the_solver():
    phi = _relu_features(1000, 94)
    K = (phi @ phi.T).astype(np.float64)
    y = np.where(np.random.default_rng(1).random(1000) < 0.5, -1.0, 1.0)
    cert = certify_separability(K, y, False, 1e-5, time_limit=1e-9)
    assert cert.separable is None and cert.rank is not None


@pytest.mark.parametrize("rank_tol", [0.0, 1.0, -1e-5, float("nan"), "1e-5"])
def test_bad_rank_tol(separable, rank_tol):
    with pytest.raises(ConfigurationError, match=r"rank_tol must be in \(0, 1\)"):
        HardMarginSVM(rank_tol=rank_tol).fit(separable.K, separable.y)


def test_full_rank_is_recognised_on_a_submatrix(monkeypatch):
    """A full-rank kernel never reaches the O(n cap^2) factorisation; a low-rank one still does, with its rank."""
    calls = []
    real = lowrank.pivoted_cholesky
    monkeypatch.setattr(lowrank, "pivoted_cholesky", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((1500, 400))
    y = np.where(Z[:, 0] > 0, 1.0, -1.0)
    cert = lowrank.certify_separability(Z @ Z.T, y, False, lowrank.RANK_TOL)
    assert cert.rank is None and calls == []
    X, y_low = _separable_low_rank(1500, 30)
    cert = lowrank.certify_separability(X @ X.T, 2.0 * y_low - 1.0, False, lowrank.RANK_TOL)
    assert cert.rank == 30 and calls == [(len(y_low), len(y_low))]


def test_rank_exactly_at_the_cap_is_still_certified(monkeypatch):
    monkeypatch.setattr(lowrank, "MAX_RANK", 20)
    rng = np.random.default_rng(4)
    X = rng.standard_normal((600, 20))  # numerical rank 20 = the cap
    y = rng.integers(0, 2, 600)  # random labels: not separable by 20 features
    with pytest.raises(NotSeparableError, match="numerical rank r = 20"):
        HardMarginSVM().fit(X @ X.T, y)
