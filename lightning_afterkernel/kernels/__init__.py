"""Kernels of a network (pure torch): empirical NTK, conjugate kernel, exact reference, metrics."""

from lightning_afterkernel.kernels._gram import parse_memory_budget
from lightning_afterkernel.kernels._model import eval_mode
from lightning_afterkernel.kernels.conjugate import conjugate_kernel, conjugate_kernel_views, has_features_method
from lightning_afterkernel.kernels.empirical import (
    IMPLEMENTATIONS,
    empirical_ntk,
    empirical_ntk_train_test,
    empirical_ntk_views,
)
from lightning_afterkernel.kernels.metrics import (
    centered_kernel_alignment,
    effective_rank,
    eigenspectrum,
    kernel_alignment,
    kernel_distance,
    kernel_target_alignment,
)
from lightning_afterkernel.kernels.reference import reference_ntk

__all__ = [
    "IMPLEMENTATIONS",
    "centered_kernel_alignment",
    "conjugate_kernel",
    "conjugate_kernel_views",
    "effective_rank",
    "eigenspectrum",
    "empirical_ntk",
    "empirical_ntk_train_test",
    "empirical_ntk_views",
    "eval_mode",
    "has_features_method",
    "kernel_alignment",
    "kernel_distance",
    "kernel_target_alignment",
    "parse_memory_budget",
    "reference_ntk",
]
