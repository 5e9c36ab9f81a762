"""Lightning callbacks: when to compute the kernels and what to log. No maths lives here."""

from lightning_afterkernel.callbacks.after_kernel import AfterKernelCallback

__all__ = ["AfterKernelCallback"]
