"""Conjugate kernel: inner products of a model's penultimate-layer features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_afterkernel.errors import ConfigurationError, ModelError
from lightning_afterkernel.kernels._model import (
    State,
    check_model,
    check_options,
    eval_mode,
    mirror_upper,
    prepare,
)

FEATURES_BATCH = 1024
"""Examples per ``features`` call when ``batch_size`` is None."""


def has_features_method(model: nn.Module) -> bool:
    """True when ``model.features`` is a method (a submodule named ``features``, as in torchvision's VGG,
    is a stack of layers, not the penultimate representation)."""
    features = getattr(model, "features", None)
    return callable(features) and not isinstance(features, nn.Module)


def conjugate_kernel(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    paired: bool = False,
) -> Tensor:
    r"""Conjugate kernel :math:`K = \Phi(x_1) \Phi(x_2)^\top`, with :math:`\Phi(x)` = ``model.features(x)``
    (the penultimate-layer features, flattened to (n, d)).

    The model runs in eval mode under ``no_grad`` on copies of its tensors cast to ``dtype``; the model and
    its train/eval flags are left as they were. Cost: n1 + n2 forward passes and n1 n2 d multiply-adds;
    memory (n1 + n2) d + n1 n2 floats.

    Args:
        model: module with a method ``features(x)`` mapping a batch (n, ...) to features (n, ...).
        x1: inputs (n1, ...).
        x2: inputs (n2, ...) with x1's per-example shape; ``None`` gives the symmetric Gram matrix of ``x1``.
        batch_size: examples per ``features`` call; ``None`` uses 1024.
        dtype: floating dtype of the computation and of the result.
        device: where to compute; ``None`` uses the model's device.
        paired: return the vector :math:`K(x_1[i], x_2[i])` (n1 == n2; with ``x2`` None the diagonal)
            instead of a matrix: n1 + n2 forward passes and n1 d multiply-adds.

    Returns:
        The (n1, n2) kernel (or the (n1,) vector when ``paired``) in ``dtype`` on the computation device;
        exactly symmetric when ``x2`` is None.
    """
    check_model(model, needs_trainable=False)
    _check_features(model)
    check_options(dtype, batch_size=batch_size)
    with eval_mode(model), torch.inference_mode(False), torch.no_grad():
        x1, x2, trainable, fixed = prepare(model, x1, x2, dtype=dtype, device=device)
        features = _Features(model)
        state = {f"model.{name}": t for name, t in (*trainable.items(), *fixed.items())}
        phi1 = _features(features, state, x1, batch_size or FEATURES_BATCH, dtype)
        if paired:
            if x2 is not None and len(x2) != len(x1):
                raise ConfigurationError(
                    f"paired=True pairs x1[i] with x2[i], so x1 and x2 need the same number of examples; got "
                    f"{len(x1)} and {len(x2)}."
                )
            phi2 = phi1 if x2 is None else _features(features, state, x2, batch_size or FEATURES_BATCH, dtype)
            return (phi1 * phi2).sum(1)
        if x2 is None:
            return mirror_upper(phi1 @ phi1.mT)
        return phi1 @ _features(features, state, x2, batch_size or FEATURES_BATCH, dtype).mT


def conjugate_kernel_views(
    model: nn.Module,
    views: Sequence[Tensor],
    *,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Per-example Gram matrices of the features across views: :math:`G[i, a, b] = \langle \Phi(v_a[i]),
    \Phi(v_b[i]) \rangle` for v views of the same n examples; (n, v, v). One forward pass per view and
    example; options as in :func:`conjugate_kernel`."""
    views = list(views) if not isinstance(views, Tensor) else [views]
    if not views or not all(isinstance(v, Tensor) and v.ndim and v.shape == views[0].shape for v in views):
        shapes = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in views]
        raise ConfigurationError(f"views must be a non-empty sequence of tensors of one shape (n, ...); got {shapes}.")
    check_model(model, needs_trainable=False)
    _check_features(model)
    check_options(dtype, batch_size=batch_size)
    n = len(views[0])
    with eval_mode(model), torch.inference_mode(False), torch.no_grad():
        stacked, _, trainable, fixed = prepare(model, torch.cat(views), None, dtype=dtype, device=device)
        state = {f"model.{name}": t for name, t in (*trainable.items(), *fixed.items())}
        phi = _features(_Features(model), state, stacked, batch_size or FEATURES_BATCH, dtype)
        phi = phi.reshape(len(views), n, -1)
        return torch.einsum("and,bnd->nab", phi, phi)


class _Features(nn.Module):
    """Module view of ``model.features`` so that :func:`functional_call` can run it on copied tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.features(x)


def _check_features(model: nn.Module) -> None:
    if not has_features_method(model):
        raise ModelError(
            "conjugate_kernel needs model.features(x) returning the penultimate-layer features, shape "
            f"(n, d); {type(model).__name__} has no such method (a submodule named `features` does not count). "
            "Add one that runs the network up to (not "
            "including) its output layer, e.g. `def features(self, x): return self.body(x)`, and let "
            "`forward` return `self.head(self.features(x))`."
        )


def _features(features: _Features, state: State, x: Tensor, batch_size: int, dtype: torch.dtype) -> Tensor:
    parts = []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        phi = functional_call(features, state, (batch,))
        if not isinstance(phi, Tensor) or phi.ndim == 0 or phi.shape[0] != len(batch):
            shape = tuple(phi.shape) if isinstance(phi, Tensor) else type(phi).__name__
            raise ModelError(
                f"model.features must return one feature vector per example, shape (n, d); for an input of "
                f"shape {tuple(batch.shape)} it returned {shape}."
            )
        parts.append(phi.reshape(len(batch), -1).to(dtype))
    return torch.cat(parts)
