"""kernel_target_alignment with k classes: centred one-hot targets (num_classes=k)."""

from __future__ import annotations

import pytest
import torch

from lightning_afterkernel.errors import ConfigurationError, KernelError
from lightning_afterkernel.kernels import kernel_target_alignment


def random_psd(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n + 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T


@pytest.mark.parametrize("seed", range(5))
def test_two_classes_as_centred_one_hot_targets_are_the_two_class_alignment(seed):
    """Y_c = onehot(y) - 1/2 = (2y - 1)(1/2, -1/2), so Y_c Y_c^T = y y^T / 2: the same alignment."""
    kernel = random_psd(30, seed)
    y = torch.randint(0, 2, (30,), generator=torch.Generator().manual_seed(100 + seed))
    assert kernel_target_alignment(kernel, y, num_classes=2) == pytest.approx(
        kernel_target_alignment(kernel, y), rel=1e-13, abs=1e-15
    )


def test_k_classes_formula_and_extremes():
    kernel = random_psd(12, 0)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 2])
    targets = torch.nn.functional.one_hot(y, 4).double() - 0.25
    target = targets @ targets.T
    expected = float((kernel * target).sum() / (kernel.norm() * target.norm()))
    assert kernel_target_alignment(kernel, y, num_classes=4) == pytest.approx(expected, rel=1e-13)
    assert kernel_target_alignment(kernel, y.double(), num_classes=4) == kernel_target_alignment(kernel, y, 4)
    assert kernel_target_alignment(target, y, num_classes=4) == pytest.approx(1.0, abs=1e-14)
    assert kernel_target_alignment(-target, y, num_classes=4) == pytest.approx(-1.0, abs=1e-14)
    # a class absent from y still centres by 1/k: k = 5 is another target than k = 4
    assert kernel_target_alignment(target, y, num_classes=5) < 1 - 1e-3


@pytest.mark.parametrize(
    ("y", "num_classes", "error", "match"),
    [
        (torch.tensor([0, 1, 3]), 3, ConfigurationError, r"integer labels 0..2; got the values \[0, 1, 3\]"),
        (torch.tensor([-1, 0, 1]), 3, ConfigurationError, "integer labels 0..2"),
        (torch.tensor([0.0, 0.5, 1.0]), 3, ConfigurationError, "integer labels 0..2"),
        (torch.tensor([True, False, True]), 3, ConfigurationError, "integer labels"),
        (torch.tensor([0, 1, 1]), 1, ConfigurationError, "num_classes=1 must be an integer >= 2"),
        (torch.tensor([0, 1, 2]), None, ConfigurationError, "pass num_classes=k"),
        (torch.tensor([0, 1]), 3, KernelError, "y has 2 labels"),
    ],
)
def test_bad_labels_or_class_counts_are_refused(y, num_classes, error, match):
    with pytest.raises(error, match=match):
        kernel_target_alignment(torch.eye(3), y, num_classes)


def test_a_zero_kernel_has_no_alignment():
    with pytest.raises(KernelError, match="zero kernel"):
        kernel_target_alignment(torch.zeros(3, 3), torch.tensor([0, 1, 2]), num_classes=3)
