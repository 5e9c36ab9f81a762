"""Kernel metrics against their formulas: alignments, CKA, kernel-target alignment, spectrum, effective rank,
distances; the block-Lanczos spectrum and trace effective rank against the full ``eigvalsh`` on known spectra."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_afterkernel.errors import ConfigurationError, KernelError
from lightning_afterkernel.kernels import (
    centered_kernel_alignment,
    effective_rank,
    eigenspectrum,
    kernel_alignment,
    kernel_distance,
    kernel_target_alignment,
    metrics,
)
from lightning_afterkernel.kernels.metrics import DENSE_MAX_N, PSD_GUARANTEE, SPECTRUM_TOLERANCE, gram_eigenspectrum


def random_psd(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n + 2, generator=generator, dtype=torch.float64)
    return a @ a.T


@pytest.mark.parametrize("c", [1e-6, 0.5, 1.0, 3.0, 1e8])
def test_positive_multiple_has_alignment_one(c):
    kernel = random_psd(6, 0)
    assert kernel_alignment(kernel, c * kernel) == pytest.approx(1.0, abs=1e-14)


def test_orthogonal_kernels_have_alignment_zero():
    assert kernel_alignment(torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 2.0]))) == 0.0


def test_hand_computed_case_and_symmetry():
    identity, ones = torch.eye(2), torch.ones(2, 2)
    # <I, 11^T>_F = 2, ||I||_F = sqrt(2), ||11^T||_F = 2.
    assert kernel_alignment(identity, ones) == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    k1, k2 = random_psd(5, 1), random_psd(5, 2)
    value = kernel_alignment(k1, k2)
    assert isinstance(value, float) and 0.0 < value < 1.0
    assert kernel_alignment(k2, k1) == value


def test_computed_in_float64():
    big = torch.full((3, 3), 1e30)  # float32: the products overflow
    assert kernel_alignment(big, big) == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize(
    ("k1", "k2", "match"),
    [
        (torch.eye(3), torch.eye(4), "same shape"),
        (torch.zeros(3, 3), torch.eye(3), "zero kernel"),
        (torch.eye(3), torch.tensor([1.0, 2.0, 3.0]), "2-D"),
        (torch.full((2, 2), float("nan")), torch.eye(2), "non-finite"),
        ([[1.0]], torch.eye(1), "torch.Tensor"),
    ],
)
def test_malformed_kernels_are_refused(k1, k2, match):
    with pytest.raises(KernelError, match=match):
        kernel_alignment(k1, k2)


# centred kernel alignment, kernel-target alignment, eigen-spectrum, effective rank, kernel distance


def centre_columns(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(0, keepdim=True)


def test_cka_of_a_kernel_with_itself_and_its_multiples_is_one():
    kernel = random_psd(7, 3)
    assert centered_kernel_alignment(kernel, kernel) == pytest.approx(1.0, abs=1e-14)
    for c in (1e-6, 2.0, 1e8):
        assert centered_kernel_alignment(c * kernel, kernel) == pytest.approx(1.0, abs=1e-14)


def test_cka_ignores_added_constants_but_uncentred_alignment_does_not():
    k1, k2 = random_psd(6, 4), random_psd(6, 5)
    shifted = k1 + 50.0
    assert centered_kernel_alignment(shifted, k2) == pytest.approx(centered_kernel_alignment(k1, k2), abs=1e-12)
    assert kernel_alignment(shifted, k2) != pytest.approx(kernel_alignment(k1, k2), abs=1e-3)


def test_cka_matches_the_linear_cka_feature_formula():
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(9, 4, generator=generator, dtype=torch.float64) + 3.0  # non-centred features
    y = torch.randn(9, 7, generator=generator, dtype=torch.float64) - 1.0
    xc, yc = centre_columns(x), centre_columns(y)
    # Kornblith et al. (2019), eq. for linear CKA: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred features.
    expected = torch.linalg.matrix_norm(yc.T @ xc) ** 2 / (
        torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    )
    value = centered_kernel_alignment(x @ x.T, y @ y.T)
    assert value == pytest.approx(float(expected), rel=1e-12)
    assert 0.0 < value < 1.0


def test_cka_is_symmetric_and_float64():
    k1, k2 = random_psd(5, 7), random_psd(5, 8)
    assert centered_kernel_alignment(k1, k2) == centered_kernel_alignment(k2, k1)
    assert centered_kernel_alignment(k1.float(), k2.float()) == pytest.approx(
        centered_kernel_alignment(k1, k2), abs=1e-6
    )


def test_cka_refuses_constant_kernels():
    with pytest.raises(KernelError, match="k2 is constant"):
        centered_kernel_alignment(random_psd(4, 0), torch.full((4, 4), 3.0))
    with pytest.raises(KernelError, match="square"):
        centered_kernel_alignment(torch.ones(2, 3), torch.ones(2, 3))


def test_kernel_target_alignment_formula_and_label_encodings():
    kernel = random_psd(6, 9)
    y01 = torch.tensor([0, 1, 1, 0, 1, 0])
    ypm = 2.0 * y01.double() - 1
    expected = float(ypm @ kernel @ ypm / (6 * torch.linalg.matrix_norm(kernel)))
    assert kernel_target_alignment(kernel, y01) == pytest.approx(expected, rel=1e-14)
    assert kernel_target_alignment(kernel, ypm) == kernel_target_alignment(kernel, y01)
    assert kernel_target_alignment(kernel, y01.bool()) == kernel_target_alignment(kernel, y01)
    ideal = torch.outer(ypm, ypm)
    assert kernel_target_alignment(ideal, y01) == pytest.approx(1.0, abs=1e-15)
    assert kernel_target_alignment(-ideal, y01) == pytest.approx(-1.0, abs=1e-15)


@pytest.mark.parametrize(
    ("y", "error", "match"),
    [
        (torch.tensor([0, 1, 2]), ConfigurationError, r"values \[0.0, 1.0, 2.0\]"),
        (torch.tensor([-1, 0, 1]), ConfigurationError, "labels in"),
        (torch.ones(3, 1), ConfigurationError, "1-D"),
        ([0, 1, 1], ConfigurationError, "1-D tensor"),
        (torch.tensor([0, 1]), KernelError, "y has 2 labels"),
    ],
)
def test_kernel_target_alignment_refuses_bad_labels(y, error, match):
    with pytest.raises(error, match=match):
        kernel_target_alignment(torch.eye(3), y)


def test_eigenspectrum_is_descending_float64_and_exact():
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64))
    eigenvalues = torch.tensor([0.5, 4.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    kernel = (q * eigenvalues) @ q.T
    spectrum = eigenspectrum(kernel.float())
    assert spectrum.dtype == torch.float64 and spectrum.shape == (5,)
    assert torch.allclose(spectrum, eigenvalues.sort(descending=True).values, atol=1e-5)
    assert torch.allclose(eigenspectrum(kernel), torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("method", ["trace", "entropy"])
def test_effective_rank_of_identity_rank_one_and_low_rank(method):
    assert effective_rank(torch.eye(7), method) == pytest.approx(7.0, rel=1e-12)
    assert effective_rank(3.0 * torch.eye(7), method) == pytest.approx(7.0, rel=1e-12)
    v = torch.randn(8, 1, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert effective_rank(v @ v.T, method) == pytest.approx(1.0, abs=1e-9)
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    assert 1.0 < effective_rank(x @ x.T, method) <= 3.0 + 1e-9


def test_effective_rank_formulas_on_a_known_spectrum():
    kernel = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64))
    assert effective_rank(kernel) == pytest.approx(8.0 / 4.0, rel=1e-15)  # trace / largest eigenvalue
    # p = (1/2, 1/4, 1/8, 1/8): entropy = (1/2 + 1/2 + 3/4) log 2.
    assert effective_rank(kernel, "entropy") == pytest.approx(2**1.75, rel=1e-14)
    assert effective_rank(kernel) <= effective_rank(kernel, "entropy")


@pytest.mark.parametrize(
    ("kernel", "error", "match"),
    [
        (torch.zeros(3, 3), KernelError, "positive eigenvalue"),
        (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), KernelError, "not positive semi-definite"),
        (torch.tensor([[1.0, 2.0], [0.0, 1.0]]), KernelError, "not symmetric"),
        (torch.ones(2, 3), KernelError, "square"),
        (torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]]), KernelError, "non-finite"),
    ],
)
def test_effective_rank_refuses_bad_kernels(kernel, error, match):
    with pytest.raises(error, match=match):
        effective_rank(kernel)


def test_effective_rank_refuses_unknown_method():
    with pytest.raises(ConfigurationError, match="'trace' or 'entropy'"):
        effective_rank(torch.eye(2), "stable")


def test_kernel_distances():
    k1, k2 = random_psd(6, 13), random_psd(6, 14)
    assert kernel_distance(k1, k1) == pytest.approx(0.0, abs=1e-14)
    assert kernel_distance(5.0 * k1, k1) == pytest.approx(0.0, abs=1e-14)
    assert kernel_distance(k1, k2) == pytest.approx(1.0 - kernel_alignment(k1, k2), abs=1e-15)
    assert kernel_distance(k1 + 9.0, k1, "cka") == pytest.approx(0.0, abs=1e-12)
    assert kernel_distance(k1, k2, "cka") == pytest.approx(1.0 - centered_kernel_alignment(k1, k2), abs=1e-15)
    assert kernel_distance(5.0 * k1, k1, "frobenius") == pytest.approx(4.0, rel=1e-14)
    expected = torch.linalg.matrix_norm(k1 - k2) / torch.linalg.matrix_norm(k2)
    assert kernel_distance(k1, k2, "frobenius") == pytest.approx(float(expected), rel=1e-14)
    cross = torch.randn(3, 5, dtype=torch.float64)  # alignment and Frobenius also take cross kernels
    assert kernel_distance(cross, 2.0 * cross, "frobenius") == pytest.approx(0.5, rel=1e-14)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.eye(3), torch.zeros(3, 3), "frobenius"), KernelError, "zero reference"),
        ((torch.eye(3), torch.eye(4), "frobenius"), KernelError, "same shape"),
        ((torch.eye(3), torch.eye(3), "l2"), ConfigurationError, "'alignment', 'cka' or 'frobenius'"),
        ((torch.ones(2, 3), torch.ones(2, 3), "cka"), KernelError, "square"),
        ((torch.eye(2), torch.full((2, 2), float("nan")), "alignment"), KernelError, "non-finite"),
    ],
)
def test_kernel_distance_refuses_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        kernel_distance(*args)


def test_effective_rank_from_a_precomputed_spectrum():
    torch.manual_seed(0)
    features = torch.randn(30, 5, dtype=torch.float64)
    kernel = features @ features.T
    spectrum = eigenspectrum(kernel)
    for method in ("trace", "entropy"):
        assert effective_rank(spectrum, method) == pytest.approx(effective_rank(kernel, method), rel=1e-12)
    with pytest.raises(KernelError, match="non-empty finite 1-D"):
        effective_rank(torch.tensor([1.0, float("nan")]))


# block Lanczos (n > DENSE_MAX_N): eigenspectrum(top=k) and effective_rank(K, "trace") against the full eigvalsh

N = 700


def with_spectrum(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * eigenvalues) @ q.T


def decaying(n: int = N) -> torch.Tensor:
    return 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.5


def clustered(n: int = N) -> torch.Tensor:
    values = 1e-3 * decaying(n)
    values[:8] = 1.0 - 1e-7 * torch.arange(8)  # eight top eigenvalues within 1e-6 of each other
    values[8:20] = 0.5 + 1e-9 * torch.arange(12)  # and a second cluster straddling the top 10
    return values


def near_multiple_top(n: int = N) -> torch.Tensor:
    values = 0.5 * decaying(n)
    values[:3] = torch.tensor([1.0, 1.0 - 1e-10, 1.0 - 1e-8], dtype=torch.float64)
    return values


def rank_deficient(n: int = N) -> torch.Tensor:
    values = torch.zeros(n, dtype=torch.float64)
    values[:3] = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    return values


SPECTRA = {
    "decaying": decaying,
    "clustered": clustered,
    "near_multiple_top": near_multiple_top,
    "rank_deficient": rank_deficient,
}


@pytest.fixture
def lanczos_only(monkeypatch):
    """Call it after computing the test's reference spectra: from then on, a metric that falls back to the full
    eigvalsh of a kernel above DENSE_MAX_N fails the test."""
    full = torch.linalg.eigvalsh

    def guarded(matrix, *args, **kwargs):
        assert len(matrix) <= DENSE_MAX_N, f"eigvalsh of a {len(matrix)} x {len(matrix)} matrix"
        return full(matrix, *args, **kwargs)

    return lambda: monkeypatch.setattr(metrics.torch.linalg, "eigvalsh", guarded)


@pytest.mark.parametrize("name", SPECTRA)
@pytest.mark.parametrize("top", [1, 12, 30])
def test_top_eigenvalues_match_the_full_spectrum(name, top, lanczos_only):
    kernel = with_spectrum(SPECTRA[name](), seed=20)
    exact = torch.linalg.eigvalsh(kernel).flip(0)
    lanczos_only()
    values = eigenspectrum(kernel, top=top)
    assert values.dtype == torch.float64 and values.shape == (top,)
    assert (values[:-1] >= values[1:]).all()
    assert (values - exact[:top]).abs().max() <= SPECTRUM_TOLERANCE * exact[0]


@pytest.mark.parametrize("name", SPECTRA)
def test_trace_rank_from_the_largest_eigenvalue_matches_the_full_spectrum(name, lanczos_only):
    kernel = with_spectrum(SPECTRA[name](), seed=21)
    exact = torch.linalg.eigvalsh(kernel)
    full = effective_rank(exact.flip(0), "trace")
    assert full == pytest.approx(float(kernel.trace() / exact[-1]), rel=1e-12)
    lanczos_only()
    assert effective_rank(kernel, "trace") == pytest.approx(full, rel=SPECTRUM_TOLERANCE)


def test_float32_kernels_are_read_exactly(lanczos_only):
    kernel = with_spectrum(decaying(), seed=22).float()
    exact = torch.linalg.eigvalsh(kernel.double()).flip(0)
    lanczos_only()
    values = eigenspectrum(kernel, top=10)
    assert values.dtype == torch.float64
    assert (values - exact[:10]).abs().max() <= SPECTRUM_TOLERANCE * exact[0]
    assert effective_rank(kernel, "trace") == pytest.approx(float(kernel.double().trace() / exact[0]), rel=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_kernels(n):
    kernel = with_spectrum(torch.arange(n, 0, -1, dtype=torch.float64), seed=23)
    exact = torch.linalg.eigvalsh(kernel).flip(0)
    for top in range(1, n + 2):  # top > n returns all n
        assert torch.allclose(eigenspectrum(kernel, top=top), exact[:top], rtol=0, atol=1e-12)
    assert effective_rank(kernel, "trace") == pytest.approx(float(exact.sum() / exact[0]), rel=1e-12)


@pytest.mark.parametrize("negative", [-PSD_GUARANTEE, -0.5, -3.0])
def test_kernels_far_from_psd_are_refused_without_the_full_spectrum(negative, lanczos_only):
    values = torch.linspace(0.0, 1.0, N, dtype=torch.float64)  # a bulk from 0 to the largest, then one negative
    values[0] = negative
    lanczos_only()
    with pytest.raises(KernelError, match="not positive semi-definite"):
        effective_rank(with_spectrum(values, seed=24), "trace")


def test_a_negative_diagonal_entry_is_refused(lanczos_only):
    kernel = with_spectrum(decaying(), seed=25)
    kernel[3, 3] = -1e-3 * float(kernel.diagonal().max())
    lanczos_only()
    with pytest.raises(KernelError, match="not positive semi-definite"):
        effective_rank(kernel, "trace")


def test_rounding_noise_below_the_tolerance_is_accepted(lanczos_only):
    values = decaying()
    values[-5:] = -1e-6  # float32-like noise, within PSD_TOLERANCE
    kernel = with_spectrum(values, seed=26)
    lanczos_only()
    assert effective_rank(kernel, "trace") == pytest.approx(float(values.sum() / values[0]), rel=1e-9)


def test_dense_route_checks_psd_exactly():
    values = decaying(DENSE_MAX_N)
    values[-1] = -2 * metrics.PSD_TOLERANCE
    with pytest.raises(KernelError, match="not positive semi-definite"):
        effective_rank(with_spectrum(values, seed=27), "trace")


def test_lanczos_is_reproducible_and_leaves_the_global_generator_alone():
    kernel = with_spectrum(clustered(), seed=28)
    state = torch.get_rng_state()
    first = eigenspectrum(kernel, top=12)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(eigenspectrum(kernel, top=12), first)


def test_uncertified_lanczos_falls_back_to_the_full_spectrum(monkeypatch):
    kernel = with_spectrum(decaying(), seed=29)
    monkeypatch.setattr(metrics, "SPECTRUM_TOLERANCE", 0.0)  # no residual is ever small enough
    with pytest.warns(UserWarning, match="did not certify"):
        values = eigenspectrum(kernel, top=5)
    assert torch.allclose(values, torch.linalg.eigvalsh(kernel).flip(0)[:5], rtol=0, atol=1e-14)


@pytest.mark.parametrize("top", [0, -1, 1.5, True, "3"])
def test_eigenspectrum_refuses_a_bad_top(top):
    with pytest.raises(ConfigurationError, match="top must be a positive integer"):
        eigenspectrum(torch.eye(3), top=top)


def test_gram_eigenspectrum_is_the_kernel_spectrum():
    generator = torch.Generator().manual_seed(30)
    for n, d in ((50, 7), (7, 50)):
        features = torch.randn(n, d, generator=generator, dtype=torch.float64).float().double()
        kernel = features @ features.T
        values, exact = gram_eigenspectrum(features.float()), eigenspectrum(kernel)
        assert values.dtype == torch.float64 and values.shape == (min(n, d),)
        assert (values - exact[: min(n, d)]).abs().max() <= 1e-10 * exact[0]
        for method in ("trace", "entropy"):
            assert effective_rank(values, method) == pytest.approx(effective_rank(kernel, method), rel=1e-9)
    for bad, match in (
        (torch.ones(3), "2-D"),
        (torch.ones(3, 0), "non-empty"),
        (torch.full((2, 2), math.nan), "non-finite"),
    ):
        with pytest.raises(KernelError, match=match):
            gram_eigenspectrum(bad)


def test_symmetry_is_checked_across_tiles():
    n = metrics._TILE + 76
    kernel = with_spectrum(decaying(n), seed=31)
    skewed = kernel.clone()
    skewed[5, n - 3] += 1e-3 * float(kernel.abs().max())  # in an off-diagonal tile
    with pytest.raises(KernelError, match="not symmetric"):
        eigenspectrum(skewed, top=3)
    slightly = kernel.clone()
    slightly[5, n - 3] += 1e-12
    expected = torch.linalg.eigvalsh((slightly + slightly.T) / 2).flip(0)
    assert torch.allclose(eigenspectrum(slightly), expected, rtol=0, atol=1e-14)


def test_blocked_passes_match_the_direct_formulas():
    n = 2 * metrics._ROWS + 37
    k1, k2 = random_psd(n, 32), random_psd(n, 33) + 4.0
    centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
    c1, c2 = centre @ k1 @ centre, centre @ k2 @ centre
    cka = float((c1 * c2).sum() / (torch.linalg.matrix_norm(c1) * torch.linalg.matrix_norm(c2)))
    frobenius = float(torch.linalg.matrix_norm(k1 - k2) / torch.linalg.matrix_norm(k2))
    alignment = float((k1 * k2).sum() / (torch.linalg.matrix_norm(k1) * torch.linalg.matrix_norm(k2)))
    for a, b in ((k1, k2), (k1.T, k2.T)):  # contiguous and transposed (strided) views
        assert centered_kernel_alignment(a, b) == pytest.approx(cka, rel=1e-12)
        assert kernel_distance(a, b, "frobenius") == pytest.approx(frobenius, rel=1e-12)
        assert kernel_alignment(a, b) == pytest.approx(alignment, rel=1e-12)


@pytest.mark.gpu
def test_cuda_kernels_match_the_cpu():
    kernel = with_spectrum(clustered(), seed=34)
    on_gpu = kernel.float().cuda()
    cpu = eigenspectrum(kernel.float(), top=12)
    assert eigenspectrum(on_gpu, top=12).device.type == "cuda"
    assert (eigenspectrum(on_gpu, top=12).cpu() - cpu).abs().max() <= 2 * SPECTRUM_TOLERANCE * cpu[0]
    assert effective_rank(on_gpu, "trace") == pytest.approx(effective_rank(kernel.float(), "trace"), rel=1e-6)


def test_near_constant_and_near_equal_kernels_are_computed_explicitly():
    n = 300
    k1, k2 = random_psd(n, 35), random_psd(n, 36)
    near_constant = k1 + 1e8  # ||HKH||^2 / ||K||^2 ~ 1e-11: the one-pass identity would keep ~5 digits
    centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
    c1, c2 = centre @ near_constant @ centre, centre @ k2 @ centre
    expected = float((c1 * c2).sum() / (torch.linalg.matrix_norm(c1) * torch.linalg.matrix_norm(c2)))
    assert centered_kernel_alignment(near_constant, k2) == pytest.approx(expected, rel=1e-9)
    nudged = k1 + 1e-9 * k2  # ||K - R|| ~ 1e-9 ||R||: below float64's resolution of ||K||^2 - 2<K, R> + ||R||^2
    expected = float(torch.linalg.matrix_norm(nudged - k1) / torch.linalg.matrix_norm(k1))
    assert kernel_distance(nudged, k1, "frobenius") == pytest.approx(expected, rel=1e-6)
