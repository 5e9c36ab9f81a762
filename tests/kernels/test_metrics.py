"""kernel_alignment: the cosine between kernel matrices."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_afterkernel.errors import KernelError
from lightning_afterkernel.kernels import kernel_alignment


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
