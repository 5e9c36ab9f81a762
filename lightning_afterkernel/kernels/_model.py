"""Helpers shared by the kernel functions: argument checks, model state, per-example logits.

The model is left as it was: :func:`torch.func.functional_call` runs it on detached versions of its
tensors (copies when the dtype or device changes), swapped in for the duration of each call, so autograd
never touches its parameters or their ``.grad``; every submodule's train/eval flag is put back after use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_afterkernel.errors import ConfigurationError, ModelError

State = dict[str, Tensor]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with every submodule in eval mode; restore each one's flag afterwards, even on error."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def autograd_enabled() -> Iterator[None]:
    """Enable autograd inside the block, also when the caller runs under ``no_grad`` or ``inference_mode``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def check_model(model: nn.Module, *, needs_trainable: bool) -> None:
    """Raise :class:`ModelError` unless ``model`` is an ``nn.Module`` (with trainable parameters if asked)."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if needs_trainable and not any(p.requires_grad for p in model.parameters()):
        raise ModelError(
            "model has no parameter with requires_grad=True, so its NTK is zero; "
            "unfreeze the parameters the kernel should differentiate."
        )


def check_options(dtype: torch.dtype, **sizes: int | None) -> None:
    """Raise :class:`ConfigurationError` for a non-floating ``dtype`` or a size that is not a positive int."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigurationError(f"dtype must be a floating-point torch.dtype (e.g. torch.float64); got {dtype!r}.")
    for name, size in sizes.items():
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigurationError(f"{name} must be a positive int or None (automatic); got {size!r}.")


def check_inputs(x1: Tensor, x2: Tensor | None) -> None:
    """Raise :class:`ConfigurationError` unless x1 (and x2) are tensors of n >= 1 examples of one shape."""
    named = [("x1", x1)] if x2 is None else [("x1", x1), ("x2", x2)]
    for name, x in named:
        if not isinstance(x, Tensor):
            raise ConfigurationError(f"{name} must be a torch.Tensor of shape (n, ...); got {type(x).__name__}.")
        if x.ndim == 0 or x.shape[0] == 0:
            raise ConfigurationError(
                f"{name} must hold at least one example (shape (n, ...), n >= 1); got shape {tuple(x.shape)}."
            )
    if x2 is not None and x1.shape[1:] != x2.shape[1:]:
        raise ConfigurationError(
            f"x1 and x2 must have the same per-example shape; got x1 {tuple(x1.shape)}, x2 {tuple(x2.shape)}."
        )


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer; ``fallback`` for a model without tensors."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return fallback


def move(tensor: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``tensor`` on ``device``, cast to ``dtype`` if floating; an inference-mode tensor is cloned first so
    that autograd may use it. Call under ``torch.inference_mode(False)``."""
    if tensor.is_inference():
        tensor = tensor.clone()
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)


def functional_state(model: nn.Module, *, dtype: torch.dtype, device: torch.device) -> tuple[State, State]:
    """The model's tensors, detached, on ``device``, floats in ``dtype``, for :func:`functional_call`.

    Returns ``(trainable, fixed)``: the parameters with ``requires_grad=True`` (those the NTK differentiates)
    and the other parameters plus the buffers. Call under ``torch.inference_mode(False)``.
    """
    trainable: State = {}
    fixed: State = {}
    for name, parameter in model.named_parameters():
        (trainable if parameter.requires_grad else fixed)[name] = move(parameter.detach(), dtype, device)
    for name, buffer in model.named_buffers():
        fixed[name] = move(buffer, dtype, device)
    return trainable, fixed


def prepare(
    model: nn.Module, x1: Tensor, x2: Tensor | None, *, dtype: torch.dtype, device: torch.device | str | None
) -> tuple[Tensor, Tensor | None, State, State]:
    """Checked inputs and the model's functional state (see :func:`functional_state`), all on ``device``
    (``None``: the model's) with floats in ``dtype``. ``x2`` comes back ``None`` when it is ``x1`` itself, so
    that the symmetric path is taken. Call under ``torch.inference_mode(False)``."""
    check_inputs(x1, x2)
    device = model_device(model, fallback=x1.device) if device is None else torch.device(device)
    trainable, fixed = functional_state(model, dtype=dtype, device=device)
    x2 = None if x2 is None or x2 is x1 else move(x2, dtype, device)
    return move(x1, dtype, device), x2, trainable, fixed


def scalar_logit(model: nn.Module, trainable: State, fixed: State, x: Tensor) -> Tensor:
    """f(x) for ONE example ``x`` (no batch dimension), as a 0-d tensor; the model runs on a batch of one."""
    batch = x.unsqueeze(0)
    out = functional_call(model, (trainable, fixed), (batch,))
    if not isinstance(out, Tensor) or tuple(out.shape) not in ((1,), (1, 1)):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelError(
            f"the model must return one scalar logit per example, shape (n,) or (n, 1); for an input of "
            f"shape {tuple(batch.shape)} it returned {shape}. For a multi-output model, wrap it in a module "
            "whose forward selects one output (e.g. the logit of one class)."
        )
    return out.reshape(())


def mirror_upper(kernel: Tensor) -> Tensor:
    """The exactly symmetric matrix whose upper triangle (diagonal included) is ``kernel``'s."""
    return kernel.triu() + kernel.triu(1).mT
