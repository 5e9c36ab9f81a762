"""Kernel metrics against their formulas: alignments, CKA, kernel-target alignment, spectrum, effective rank,
distances."""

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
)


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
