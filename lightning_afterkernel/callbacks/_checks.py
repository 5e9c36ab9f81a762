"""The checks of :class:`~lightning_afterkernel.callbacks.AfterKernelCallback`'s arguments (at construction) and of
the model (at setup), so that a bad value fails before training starts, with a message that names the argument and
what to do."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lightning_afterkernel.callbacks.rows import INVARIANCE_IMAGES, KERNEL_LABELS
from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.kernels import IMPLEMENTATIONS, has_features_method, parse_memory_budget
from lightning_afterkernel.svm import HardMarginSVM


def check_schedule(epochs: Sequence[int], at_end: bool) -> list[int]:
    out = list(epochs)
    if any(not isinstance(e, int) or isinstance(e, bool) or e < 0 for e in out):
        raise ConfigurationError(
            f"epochs={out!r} must be non-negative integers: 0 is the initial kernel (before any step), "
            "e the kernel after e training epochs."
        )
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ConfigurationError(f"epochs={out!r} must be strictly increasing, e.g. [0, 2, 10].")
    if not out and not at_end:
        raise ConfigurationError("Nothing to compute: epochs is empty and at_end is False.")
    return out


def check_kernels(kernels: Sequence[str] | str) -> list[str]:
    out = [kernels] if isinstance(kernels, str) else list(kernels)
    unknown = [k for k in out if k not in KERNEL_LABELS]
    if not out or unknown or len(set(out)) != len(out):
        raise ConfigurationError(
            f"kernels={out!r} must be a non-empty list without repeats drawn from {list(KERNEL_LABELS)} "
            "('ntk': empirical neural tangent kernel, 'ck': conjugate kernel of the penultimate features)."
        )
    return out


def check_computation(
    n_train: int, n_test: int, dtype: str, kernel_batch_size: int | None, implementation: str, memory_budget: Any
) -> None:
    if not isinstance(n_train, int) or n_train < 2:
        raise ConfigurationError(f"n_train={n_train!r} must be an integer >= 2 (the SVM needs both classes).")
    if not isinstance(n_test, int) or n_test < 1:
        raise ConfigurationError(f"n_test={n_test!r} must be a positive integer.")
    if dtype not in ("float32", "float64"):
        raise ConfigurationError(f"dtype={dtype!r} must be 'float32' or 'float64'.")
    if kernel_batch_size is not None and kernel_batch_size < 1:
        raise ConfigurationError(f"kernel_batch_size={kernel_batch_size} must be positive or None.")
    if implementation not in IMPLEMENTATIONS:
        raise ConfigurationError(f"implementation={implementation!r} must be one of {list(IMPLEMENTATIONS)}.")
    parse_memory_budget(memory_budget)  # a bad budget fails here, not after the first epoch


def check_svm(svm: Mapping[str, Any] | None, soft_margin_c: float | None) -> dict[str, Any]:
    options = dict(svm or {})
    try:  # unknown SVM options or bad values fail here, not hours into training
        HardMarginSVM(**options).check_params()
    except TypeError as err:
        raise ConfigurationError(f"svm={options!r} is not a valid set of HardMarginSVM options: {err}") from err
    if soft_margin_c is not None and not soft_margin_c > 0:
        raise ConfigurationError(f"soft_margin_c={soft_margin_c!r} must be a positive C, or None to disable.")
    return options


def check_invariance(n_invariance: int, invariance_images: str) -> None:
    if isinstance(n_invariance, bool) or not isinstance(n_invariance, int) or n_invariance < 0:
        raise ConfigurationError(
            f"n_invariance={n_invariance!r} must be a non-negative integer: the number of images the "
            "invariance scores are averaged over (0 turns them off)."
        )
    if invariance_images not in INVARIANCE_IMAGES:
        raise ConfigurationError(
            f"invariance_images={invariance_images!r} must be 'test' (score the first images of the test subset, "
            "as the paper's code does) or 'train' (those of the train subset)."
        )


def check_outputs(on_error: str, figures: bool, save_kernels: bool, name: str | None) -> None:
    if on_error not in ("raise", "warn"):
        raise ConfigurationError(
            f"on_error={on_error!r} must be 'raise' (a failed kernel computation stops training) or 'warn' "
            "(it is recorded with NaN metrics and a warning, and training goes on)."
        )
    for option, value in (("figures", figures), ("save_kernels", save_kernels)):
        if not isinstance(value, bool):
            raise ConfigurationError(f"{option}={value!r} must be True or False.")
    if name is not None and not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)):
        raise ConfigurationError(
            f"name={name!r} must be None or a short name of letters, digits, '_', '.' and '-' (it becomes a "
            "folder and a prefix of the logged keys), e.g. name='float64'."
        )


def usable_kernels(model: nn.Module, kernels: Sequence[str]) -> list[str]:
    """The kernels asked for that the model allows: the CK needs a ``features(x)`` method (skipped with a message
    without one; an error when it is the only kernel asked for)."""
    if "ck" not in kernels or has_features_method(model):
        return list(kernels)
    if list(kernels) == ["ck"]:
        raise ConfigurationError(
            "AfterKernelCallback: kernels=['ck'] but the model has no `features(x)` method; "
            "add it, or ask for kernels=['ntk']."
        )
    rank_zero_warn(
        f"AfterKernelCallback: the conjugate kernel is skipped because {type(model).__name__} "
        "has no `features(x)` method (a submodule named `features` does not count). Add one returning "
        "the penultimate features (n, d) to get the CK."
    )
    return [k for k in kernels if k != "ck"]
