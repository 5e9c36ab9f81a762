"""Exact re-layouts of operators that are slow in PyTorch's default (NCHW) layout on CPU, for the capture.

PyTorch's CPU max-pooling in NCHW runs a scalar loop per output element; in channels-last it is vectorised
over the channels. On the paper's VGG (2-core AMD EPYC, one thread) a 2 x 2 pool of 35 x 38 x 28 x 28
float32 activations took 5.6 ms NCHW and 0.6 ms channels-last, 0.35 ms for the conversion: the pooling was
~7% of the kernel's capture. :class:`ChannelsLastMaxPool` routes ``F.max_pool2d`` through channels-last and
returns NCHW tensors. Max-pooling only selects, so the values, the indices (flat ``h * W + w`` per plane in
both layouts, first maximum in the window's scan order, NaN propagating) and the gradients (PyTorch's own
NCHW backward, scattering with those indices) are bitwise those of the NCHW operator; the tests check it.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

MIN_CHANNELS = 4
"""Fewer channels leave the vectorised loop little to do: with 1-3 channels channels-last was 1.2-1.4x slower
(35 x C x 28 x 28 and 32 x 32, float32 and float64), from 4 channels 1.3-4x faster."""
_SIGNATURE = inspect.signature(F.max_pool2d_with_indices)
_DTYPES = (torch.float32, torch.float64)


class _MaxPool2dChannelsLast(torch.autograd.Function):
    """``max_pool2d_with_indices`` computed in channels-last; NCHW output, indices and input gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel, stride, padding, dilation, ceil_mode: bool) -> tuple[Tensor, Tensor]:
        args = (kernel, stride, padding, dilation, ceil_mode)
        out, indices = torch._C._nn.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last), *args)
        out, indices = out.contiguous(), indices.contiguous()
        ctx.save_for_backward(x, indices)
        ctx.args = args
        ctx.mark_non_differentiable(indices)
        return out, indices

    @staticmethod
    def backward(ctx, grad: Tensor, _: Tensor | None) -> tuple[Tensor | None, ...]:
        x, indices = ctx.saved_tensors
        grad_input = torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), x, *ctx.args, indices)
        return (grad_input, None, None, None, None, None)


class ChannelsLastMaxPool(TorchFunctionMode):
    """Within this mode, ``F.max_pool2d`` (and so ``nn.MaxPool2d``) on a contiguous 4-D float32/float64 CPU
    tensor with at least :data:`MIN_CHANNELS` channels runs in channels-last; every other call is unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.max_pool2d or func is F.max_pool2d_with_indices:
            bound = _SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            x = a["input"]
            if _eligible(x):
                stride = a["kernel_size"] if a["stride"] is None or _empty(a["stride"]) else a["stride"]
                pooled = _MaxPool2dChannelsLast.apply(
                    x, a["kernel_size"], stride, a["padding"], a["dilation"], a["ceil_mode"]
                )
                return pooled if a["return_indices"] or func is F.max_pool2d_with_indices else pooled[0]
        return func(*args, **kwargs)


def _eligible(x: object) -> bool:
    return (
        not _under_functorch()  # vmap/grad over the call (the Function has no functorch rules)
        and type(x) is Tensor
        and x.ndim == 4
        and x.device.type == "cpu"
        and x.dtype in _DTYPES
        and x.shape[1] >= MIN_CHANNELS
        and x.is_contiguous()
    )


def _under_functorch() -> bool:
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is None or peek() is not None


def _empty(value: object) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 0


def uses_max_pool(model: nn.Module) -> bool:
    """Whether ``model`` has an ``nn.MaxPool2d`` (the mode intercepts every torch call in the forward, at a few
    microseconds each, so it is entered only for such models)."""
    return any(isinstance(module, nn.MaxPool2d) for module in model.modules())
