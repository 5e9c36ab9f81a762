"""Kernels of a network (pure torch): empirical NTK, conjugate kernel, exact reference, metrics."""

from lightning_afterkernel.kernels.conjugate import conjugate_kernel, has_features_method
from lightning_afterkernel.kernels.empirical import empirical_ntk
from lightning_afterkernel.kernels.metrics import kernel_alignment
from lightning_afterkernel.kernels.reference import reference_ntk

__all__ = ["conjugate_kernel", "empirical_ntk", "has_features_method", "kernel_alignment", "reference_ntk"]
