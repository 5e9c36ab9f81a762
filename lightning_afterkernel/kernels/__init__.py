"""Kernels of a network (pure torch): empirical NTK, conjugate kernel, exact reference, metrics."""

from lightning_afterkernel.kernels._gram import parse_memory_budget
from lightning_afterkernel.kernels.conjugate import conjugate_kernel, has_features_method
from lightning_afterkernel.kernels.empirical import IMPLEMENTATIONS, empirical_ntk, empirical_ntk_train_test
from lightning_afterkernel.kernels.metrics import kernel_alignment
from lightning_afterkernel.kernels.reference import reference_ntk

__all__ = [
    "IMPLEMENTATIONS",
    "conjugate_kernel",
    "empirical_ntk",
    "empirical_ntk_train_test",
    "has_features_method",
    "kernel_alignment",
    "parse_memory_budget",
    "reference_ntk",
]
