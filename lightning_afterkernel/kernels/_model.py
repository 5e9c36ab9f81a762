"""Helpers shared by the kernel functions: argument checks, model state, per-example logits.

The model is left as it was: :func:`torch.func.functional_call` runs it on detached versions of its
tensors (copies when the dtype or device changes), swapped in for the duration of each call, so autograd
never touches its parameters or their ``.grad``; every submodule's train/eval flag is put back after use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_afterkernel.errors import ConfigurationError, ModelError

State = dict[str, Tensor]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with every submodule in eval mode; restore each one's flag afterwards, even on error, and
    the very tensor objects registered as its parameters and buffers.

    (``torch.func.functional_call`` restores a module reached under two names, e.g. ``self.b = self.a``, with the
    tensors it swapped in: the model would be left holding detached copies instead of its parameters, which its
    optimiser no longer updates. Seen with torch 2.14.)"""
    modules = list(model.modules())  # (each module once, however many names it has)
    flags = [module.training for module in modules]
    tensors = [(dict(module._parameters), dict(module._buffers)) for module in modules]
    try:
        model.eval()
        yield
    finally:
        for module, flag, (parameters, buffers) in zip(modules, flags, tensors, strict=True):
            module.training = flag
            for table, saved in ((module._parameters, parameters), (module._buffers, buffers)):
                for name, tensor in saved.items():
                    if table.get(name) is not tensor:
                        table[name] = tensor


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


def check_logits(out: object, x: Tensor) -> int:
    """The number of logits k of ``out``, the model's output for the batch ``x``: (n,) or (n, 1) is one logit per
    example, (n, k) k of them; anything else raises :class:`ModelError`."""
    if isinstance(out, Tensor) and out.is_floating_point() and out.ndim in (1, 2) and len(out) == len(x):
        return 1 if out.ndim == 1 else out.shape[1]
    shape = f"shape {tuple(out.shape)} ({out.dtype})" if isinstance(out, Tensor) else type(out).__name__
    raise ModelError(
        f"the model must return floating-point logits per example, shape (n,) or (n, 1) (one logit) or (n, k) "
        f"(k logits); for an input of shape {tuple(x.shape)} it returned {shape}. Wrap it in a module whose "
        "forward returns such a tensor (e.g. the logits of a dict or tuple output)."
    )


def scalar_logit(model: nn.Module, trainable: State, fixed: State, x: Tensor) -> Tensor:
    """f(x) for ONE example ``x`` (no batch dimension) of a one-logit model, as a 0-d tensor."""
    batch = x.unsqueeze(0)
    out = functional_call(model, (trainable, fixed), (batch,))
    if check_logits(out, batch) != 1:
        raise ModelError(f"expected a model with one logit per example; it returned shape {tuple(out.shape)}.")
    return out.reshape(())


def example_logits(model: nn.Module, trainable: State, fixed: State, x: Tensor) -> Tensor:
    """f(x) for ONE example ``x`` (no batch dimension), as a 1-D tensor of its k logits."""
    batch = x.unsqueeze(0)
    out = functional_call(model, (trainable, fixed), (batch,))
    check_logits(out, batch)
    return out.reshape(-1)


@dataclass(frozen=True)
class Outputs:
    """Which logits a kernel is of, resolved against the model's k logits (``outputs=`` of the kernel functions).

    ``logits``: the column indices differentiated (None: the model's one logit, taken as it is, so one-logit models
    compute exactly what they always did); ``stacked``: one kernel block per pair of logits (``"full"``) rather
    than their sum (``"trace"``, or one logit); ``full``: the result has two trailing (k, k) dimensions."""

    k: int
    logits: tuple[int, ...] | None
    stacked: bool
    full: bool

    @property
    def count(self) -> int:
        """Logits differentiated."""
        return 1 if self.logits is None else len(self.logits)


OUTPUT_MODES = ("trace", "full")


def resolve_outputs(outputs: object, model: nn.Module, trainable: State, fixed: State, x: Tensor) -> Outputs:
    """:class:`Outputs` for ``outputs`` (``"trace"``, ``"full"`` or a logit index) and the model's output on the
    first two examples of ``x`` (one forward, without gradients)."""
    valid = isinstance(outputs, str) and outputs in OUTPUT_MODES
    if not valid and (isinstance(outputs, bool) or not isinstance(outputs, int)):
        raise ConfigurationError(
            f"outputs={outputs!r} must be 'trace' (sum over the logits of each logit's NTK), 'full' (the (k, k) "
            "blocks of every pair of logits) or an int c (the NTK of logit c)."
        )
    with torch.no_grad():  # (on a copy: a forward may change its input in place)
        k = check_logits(functional_call(model, (trainable, fixed), (x[:2].clone(),)), x[:2])
    if isinstance(outputs, int) and not 0 <= outputs < k:
        raise ConfigurationError(f"outputs={outputs} is not a logit of this model, which has {k} (0 to {k - 1}).")
    if k == 1:
        return Outputs(1, None, False, outputs == "full")
    if isinstance(outputs, int):
        return Outputs(k, (outputs,), False, False)
    return Outputs(k, tuple(range(k)), outputs == "full", outputs == "full")


def mirror_upper(kernel: Tensor) -> Tensor:
    """The exactly symmetric matrix whose upper triangle (diagonal included) is ``kernel``'s. A 4-D (n, n, k, k)
    kernel of k logits is the (n k, n k) matrix of its (example, logit) rows."""
    if kernel.ndim == 4:
        n, _, k, _ = kernel.shape
        rows = mirror_upper(kernel.permute(0, 2, 1, 3).reshape(n * k, n * k))
        return rows.view(n, k, n, k).permute(0, 2, 1, 3)
    return kernel.triu() + kernel.triu(1).mT


def swap(block: Tensor) -> Tensor:
    """The block of the transposed pairs: K(x2, x1) from K(x1, x2), (n1, n2) or (n1, n2, k, k) (logits swapped
    too); for a (n, k, k) per-example block, its logits swapped."""
    return block.permute(1, 0, 3, 2) if block.ndim == 4 else block.mT
