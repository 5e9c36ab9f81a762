"""The checks of :class:`~lightning_afterkernel.callbacks.AfterKernelCallback`'s arguments (at construction) and of
the model (at setup), so that a bad value fails before training starts, with a message that names the argument and
what to do."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_afterkernel.callbacks.evaluation import Subsets
from lightning_afterkernel.callbacks.rows import INVARIANCE_IMAGES, KERNEL_LABELS
from lightning_afterkernel.errors import ConfigurationError, DataError, ModelError
from lightning_afterkernel.kernels import IMPLEMENTATIONS, eval_mode, has_features_method, parse_memory_budget
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


def check_ntk_outputs(ntk_outputs: object) -> str | int:
    if isinstance(ntk_outputs, int) and not isinstance(ntk_outputs, bool) and ntk_outputs >= 0:
        return ntk_outputs
    if ntk_outputs == "trace":
        return "trace"
    if ntk_outputs == "full":
        raise ConfigurationError(
            "ntk_outputs='full' gives a (k, k) block of kernel values per pair of examples, and the SVMs and kernel "
            "metrics need one value per pair: use 'trace' (the sum of the k logits' kernels) or an int c (the kernel "
            "of logit c); compute the full blocks with empirical_ntk(model, x, outputs='full') yourself."
        )
    raise ConfigurationError(
        f"ntk_outputs={ntk_outputs!r} must be 'trace' (for a model with k logits, the sum over the logits of each "
        "logit's NTK; for one logit, its NTK) or an int c >= 0 (the NTK of logit c)."
    )


BINARY_LABELS = ({0, 1}, {-1, 1})
"""The label sets the SVMs and the network's accuracy read as two classes when the model has one logit."""


def _outputs(model: nn.Module, x: Tensor) -> object:
    """The model's output on ``x``: eval mode, no grad, its train/eval flags restored."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and x.is_floating_point() else x.dtype
    with torch.no_grad(), eval_mode(model):
        return model(x.to(device, dtype))


def _logits(model: nn.Module, x: Tensor) -> int:
    """The number of logits per example of the model's output on ``x``: 1 for (n,) or (n, 1), k for (n, k)."""
    out = _outputs(model, x)
    n = len(x)
    if isinstance(out, Tensor) and out.is_floating_point() and out.ndim in (1, 2) and len(out) == n:
        return 1 if out.ndim == 1 else out.shape[1]
    found = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"type {type(out).__name__}"
    raise ModelError(
        f"AfterKernelCallback: {type(model).__name__} returns {found} on {n} training examples; the kernels "
        f"need one logit per example, shape ({n},) or ({n}, 1) (a binary classifier's logit), or k logits per "
        f"example, shape ({n}, k) (a k-class classifier's). Make forward return them, e.g. `self.head(h)` with a "
        "head of k outputs."
    )


def _check_labels(subsets: Subsets, k: int) -> None:
    """The labels a model with ``k`` logits can be judged on (see :func:`check_model_and_labels`)."""
    for split, y in (("train", subsets.y_train), ("test", subsets.y_test)):
        if y.is_floating_point():
            raise DataError(
                f"AfterKernelCallback: the {split} subset's labels are not whole numbers (e.g. "
                f"{[round(v, 4) for v in y[:4].tolist()]}); the SVM needs class labels "
                + ("0 and 1 (or -1 and 1)." if k == 1 else f"0..{k - 1}.")
            )
    train, test = (set(torch.unique(y).tolist()) for y in (subsets.y_train, subsets.y_test))
    if len(train) < 2 or (k == 1 and len(train) > 2):
        wanted = "two classes" if k == 1 else "at least two classes"
        advice = "Use a binary dataset, a larger n_train, or another seed."
        if len(train) > 2:
            advice = f"One logit serves two classes: give the model one logit per class (num_classes={len(train)})."
        raise DataError(
            f"AfterKernelCallback: the {len(subsets.y_train)}-example train subset has labels {sorted(train)}; the SVM "
            f"needs {wanted}. {advice}"
        )
    if k == 1 and not any(train | test <= labels for labels in BINARY_LABELS):
        raise DataError(
            f"AfterKernelCallback: the kernel subsets have labels {sorted(train)} (train) and {sorted(test)} (test); "
            "two classes labelled 0 and 1 (or -1 and 1) are supported. Map the dataset's classes to 0 and 1."
        )
    outside = sorted(label for label in train | test if not 0 <= label < k)
    if k > 1 and outside:
        raise DataError(
            f"AfterKernelCallback: the model has {k} logits, so its classes are labelled 0..{k - 1}, but the kernel "
            f"subsets hold the labels {outside[:10]}. Label the classes 0..{k - 1} in the order of the logits, or "
            "give the model one logit per class."
        )
    unseen = sorted(test - train)
    if unseen:
        raise DataError(
            f"AfterKernelCallback: the test subset holds classes {unseen[:10]} that the {len(subsets.y_train)}-example "
            "train subset lacks, so the SVM cannot predict them. Raise n_train or change seed."
        )


def check_model_and_labels(model: nn.Module, subsets: Subsets, ntk_outputs: str | int = "trace", n: int = 4) -> int:
    """Refuse, before any training step, what the kernels, the SVMs and the network's accuracy cannot use, and
    return the model's number of logits k. The model's output on the first ``n`` training examples must be one logit
    per example, (n,) or (n, 1), or k logits, (n, k) (:class:`ModelError` otherwise), and ``ntk_outputs`` a logit of
    it (:class:`ConfigurationError`). The kernel subsets' labels must be whole numbers, with at least two classes in
    the train subset and every test class among them; one logit: two classes, 0 and 1 (or -1 and 1); k logits:
    labels 0..k-1 (:class:`DataError` otherwise)."""
    k = _logits(model, subsets.x_train[:n])
    if isinstance(ntk_outputs, int) and ntk_outputs >= k:
        raise ConfigurationError(
            f"AfterKernelCallback: ntk_outputs={ntk_outputs} is not a logit of {type(model).__name__}, which has "
            f"{k} (0 to {k - 1}); use 'trace' or an int below {k}."
        )
    _check_labels(subsets, k)
    return k
