"""Exceptions raised by lightning-afterkernel.

Every message says what was wrong, which argument or input it came from, and what to do.
All classes derive from :class:`AfterKernelError`; each also derives from the built-in
exception a caller would expect (``ValueError`` for bad input, ``RuntimeError`` for failures).
"""

from __future__ import annotations


class AfterKernelError(Exception):
    """Base class of every error raised by this package."""


class ConfigurationError(AfterKernelError, ValueError):
    """An argument has an invalid value (e.g. an epoch list that is not increasing)."""


class DataError(AfterKernelError, ValueError):
    """The data is unusable: unknown dataset or class, missing files, too few examples."""


class KernelError(AfterKernelError, ValueError):
    """A kernel matrix is malformed: wrong shape, not finite, not symmetric."""


class ModelError(AfterKernelError, ValueError):
    """The model cannot be used as asked (e.g. an output that is not logits per example, no ``features`` method)."""


class SolverError(AfterKernelError, RuntimeError):
    """An SVM solver did not return a valid hard-margin solution (time or iteration limit)."""


class NotSeparableError(SolverError):
    """The training data is not separable by the kernel, so no hard-margin SVM exists.

    ``best_margin`` holds the best minimum training margin the solver reached (``None`` if unknown).
    """

    def __init__(self, message: str, best_margin: float | None = None) -> None:
        super().__init__(message)
        self.best_margin = best_margin
