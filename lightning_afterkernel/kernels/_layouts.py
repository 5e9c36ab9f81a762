"""Operators re-done inside the capture for accuracy: convolutions computed directly (im2col times the weight) where
PyTorch's may not be direct ones, or made exact over all-zero patches (see :class:`CaptureMode`).

*Convolutions where PyTorch's may not be direct.* The float32 kernel of a ReLU network is only as close to the
float64 one as its forward pass's rounding lets ReLU gates and max-pool choices agree, and convolution
algorithms that transform their inputs by tiles (Winograd, FFT; cuDNN picks them by shape, NNPACK by size) round
each output relative to the largest values of its tile rather than to its own terms. Where an image is flat
(MNIST's black background) a convolution's input patch is all zeros and its exact output is its bias: zero at the
paper's initialisation. Those algorithms return rounding noise of either sign there, wherever a tile also holds
non-zero pixels; the ReLU after the convolution then passes the gradient through about half of these positions
(PyTorch's ReLU passes none at exactly zero), and every bias gradient sums them. On an H200 the float32 after
kernel of the paper's VGG on the full MNIST 3-vs-8 split came out 2.9e-2 (relative Frobenius) away from the
float64 one, while the tutorial's method was 3e-5 away. The same happens on CPU with oneDNN switched off, where
PyTorch convolves by NNPACK's FFT and Winograd tiles: on real MNIST (the paper's VGG at initialisation, 100 test
by 300 training images) the float32 kernel was 3.5e-2 from float64, the tutorial's too.

So wherever convolutions may not be direct (:func:`inexact_convolutions`: any device but a CPU with oneDNN, whose
convolutions are direct and return the bias exactly over all-zero patches, as a test checks), the capture fixes
``F.conv2d`` (so ``nn.Conv2d``) in one of two ways (:class:`CaptureMode`):

- As im2col patches (``F.unfold``) times the weight, one batched matmul (:func:`_conv2d_gemm`; TF32 only when the
  caller allows it, like the engine's other matmuls): a plain sum of products per output, rounded entry by entry.
  In that CPU experiment the kernel came out 8.8e-8 from float64, as with oneDNN (8.8e-8; the tutorial on oneDNN
  6.4e-8). Its autograd is that of ``unfold`` and ``matmul``, so the output gradients G and the input gradients
  are exact compositions too. It costs the patches' memory, at most :data:`GEMM_PATCH_BYTES` at a time (the batch
  is cut into parts), frozen layers included. Only the structured capture's ``F.conv2d`` is re-done: the ``vmap``
  path and other convolutions (1-D, 3-D, transposed) are PyTorch's.
- With PyTorch's convolution kept, and its outputs whose patch is all zeros (found by one max-pooling of the
  input's magnitudes with the convolution's geometry) set to the bias exactly, as an added constant, so that the
  gradients stay the convolution's (:func:`_conv2d`). This is the route on the device types in
  ``_structured.LIBRARY_CONVOLUTION_DEVICES`` (CUDA), under autocast, and for calls the first route does not
  take. In the CPU experiment, with NNPACK's tiles, it gave 6.1e-5 (the rest is gates flipped by the tiles'
  coarser rounding elsewhere). On an H200 cuDNN's with it gave the full split 3.0e-5 from float64, as im2col and
  as the tutorial's exact-float32 kernel, in 0.87 s instead of 1.17-1.30 s, and matched the tutorial on random
  images, where im2col lost a max-pool near-tie.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_CONV_SIGNATURE = inspect.signature(lambda input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1: 0)
_DTYPES = (torch.float32, torch.float64)
_PLAIN = (Tensor, nn.Parameter)


def inexact_convolutions(device: torch.device) -> bool:
    """Whether PyTorch's convolutions on ``device`` may not be direct ones (rounding by tiles, noise over all-zero
    patches): any device but a CPU with oneDNN enabled (with oneDNN off, PyTorch's CPU convolutions are NNPACK's
    tiled ones)."""
    return device.type != "cpu" or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[-1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def _pads(padding, kernel: tuple[int, int], dilation) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of ``F.conv2d``'s ``padding``: an int, a pair, "valid" or "same"."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":  # PyTorch's split: the odd element of the total goes after
        (kh, kw), (dh, dw) = kernel, _pair(dilation)
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = _pair(padding)
    return (pw, pw, ph, ph)


def zero_patches(x: Tensor, kernel: tuple[int, int], stride, padding, dilation, groups: int) -> Tensor:
    """(N, groups, H', W') bool: where the convolution's input patch of each group is all zeros (zero padding
    counts as zeros). ``padding`` is an int, a pair, "valid" or "same"."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, _pair(stride), _pair(dilation)
    n, c, h, w = x.shape
    pads = _pads(padding, kernel, dilation)
    magnitude = x.detach().abs().reshape(n, groups, c // groups, h, w).amax(2)
    magnitude = torch.where(magnitude.isnan(), float("inf"), magnitude)  # a NaN patch is not all zeros
    window = F.max_pool2d(F.pad(magnitude, pads), (kh, kw), (sh, sw), 0, (dh, dw))
    return window == 0


def _conv_call(args: tuple, kwargs: dict) -> dict:
    """The arguments of an ``F.conv2d`` call by name, defaults included."""
    bound = _CONV_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _conv2d(func, args: tuple, kwargs: dict) -> Tensor:
    """``func`` (F.conv2d) with the outputs over all-zero input patches set to the bias exactly."""
    out = func(*args, **kwargs)
    a = _conv_call(args, kwargs)
    x, weight, bias, groups = a["input"], a["weight"], a["bias"], a["groups"]
    if x.ndim != 4 or out.ndim != 4:  # unbatched: left as is
        return out
    zero = zero_patches(x, tuple(weight.shape[-2:]), a["stride"], a["padding"], a["dilation"], groups)
    n, g, ho, wo = zero.shape
    zero = zero.unsqueeze(2).expand(n, g, out.shape[1] // g, ho, wo).reshape(out.shape)
    exact = out.new_zeros(()) if bias is None else bias.detach().view(1, -1, 1, 1)
    return out + torch.where(zero, exact - out.detach(), 0)  # a constant: the gradients stay the convolution's


def _strict_pair(value) -> tuple[int, int] | None:
    """An int, or a sequence of one or two ints, as a pair; None for anything else."""
    if isinstance(value, (list, tuple)):
        value = tuple(value) * 2 if len(value) == 1 else tuple(value)
        return value if len(value) == 2 and all(isinstance(v, int) for v in value) else None
    return (value, value) if isinstance(value, int) else None


def _gemm_geometry(a: dict) -> tuple | None:
    """(kernel, stride, dilation, pads, output size) of a convolution :func:`_conv2d_gemm` takes, or None: the
    checks PyTorch's convolution makes (so that every call it would refuse is left to it, and to its error)."""
    x, weight, bias, groups = a["input"], a["weight"], a["bias"], a["groups"]
    stride, dilation, padding = a["stride"], a["dilation"], a["padding"]
    if not (
        type(weight) in _PLAIN
        and weight.ndim == 4
        and weight.dtype == x.dtype
        and weight.device == x.device
        and weight.shape[0] > 0
        and (bias is None or (type(bias) in _PLAIN and bias.dtype == x.dtype and bias.device == x.device))
        and (bias is None or tuple(bias.shape) == (weight.shape[0],))
        and isinstance(groups, int)
        and groups >= 1
        and x.shape[1] == weight.shape[1] * groups
        and weight.shape[0] % groups == 0
    ):
        return None
    stride, dilation = _strict_pair(stride), _strict_pair(dilation)
    if stride is None or dilation is None or min(*stride, *dilation) < 1:
        return None
    kernel = (weight.shape[2], weight.shape[3])
    if isinstance(padding, str):
        if padding not in ("same", "valid") or (padding == "same" and stride != (1, 1)):
            return None
    elif (pair := _strict_pair(padding)) is None or min(pair) < 0:
        return None
    left, right, top, bottom = _pads(padding, kernel, dilation)
    out_h = (x.shape[2] + top + bottom - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (x.shape[3] + left + right - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    if min(out_h, out_w) < 1:
        return None
    return kernel, stride, dilation, (left, right, top, bottom), (out_h, out_w)


GEMM_PATCH_BYTES = 256 * 2**20
"""Most bytes of im2col patches :func:`_conv2d_gemm` builds at once (the batch is cut into parts below that):
the transient memory of the capture's convolutions, whatever the chunk's size and whichever layers are frozen."""


def _conv2d_gemm(args: tuple, kwargs: dict) -> Tensor | None:
    """``F.conv2d`` as im2col patches times the weight (batched matmuls), or None for a call it does not take
    (see :class:`CaptureMode`): each output is a plain sum of products, rounded entry by entry like a direct
    convolution's, so exactly the bias over all-zero patches. Differentiable like any composition of PyTorch
    operators (the input gradient is the matmul's, folded back by ``F.fold``). The batch is taken in parts of
    at most :data:`GEMM_PATCH_BYTES` of patches (and, with groups, of the weight's expanded copy), each its own
    autograd node, so the backward's patch-sized gradients are as bounded."""
    a = _conv_call(args, kwargs)
    geometry = _gemm_geometry(a)
    if geometry is None:
        return None  # (PyTorch's convolution raises its own error, or handles what this does not)
    kernel, stride, dilation, (left, right, top, bottom), (out_h, out_w) = geometry
    x, weight, bias, groups = a["input"], a["weight"], a["bias"], a["groups"]
    if (left, top) != (right, bottom):  # ("same" with an even total): F.unfold pads symmetrically only
        x, (top, left) = F.pad(x, (left, right, top, bottom)), (0, 0)
    out_c, depth = weight.shape[0], weight[0].numel()
    # (a weight that does not require a gradient, as in the capture, is multiplied as a stride-0 expanded view,
    # and only it is saved for the backward; one that does would make matmul copy and save the patches)
    w = weight.reshape(out_c, depth) if groups == 1 else weight.reshape(groups, out_c // groups, depth)
    per_example = (x.shape[1] * kernel[0] * kernel[1] * out_h * out_w + (weight.numel() if groups > 1 else 0)) * (
        x.element_size()
    )
    parts = []
    for part in x.split(max(1, GEMM_PATCH_BYTES // per_example)):  # (one autograd node for all the parts' slices)
        patches = F.unfold(part, kernel, dilation=dilation, padding=(top, left), stride=stride)
        if groups > 1:
            patches = patches.view(len(patches), groups, depth, out_h * out_w)
        out = torch.matmul(w, patches).reshape(-1, out_c, out_h, out_w)
        parts.append(out if bias is None else out + bias.view(1, -1, 1, 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class CaptureMode(TorchFunctionMode):
    """The capture's operators: with ``gemm_convolutions``, ``F.conv2d`` (and so ``nn.Conv2d``) on 4-D
    float32/float64 inputs as im2col patches times the weight (:func:`_conv2d_gemm`), outside autocast; with
    ``exact_zero_patches``, the other such convolutions exact over all-zero patches (:func:`_conv2d`). Every other
    call, and every call under ``vmap``/``grad`` inside the forward, is PyTorch's own."""

    def __init__(self, exact_zero_patches: bool = True, gemm_convolutions: bool = False) -> None:
        super().__init__()
        self.exact_zero_patches, self.gemm_convolutions = exact_zero_patches, gemm_convolutions

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            x = args[0] if args else kwargs.get("input")
            if _plain_float(x):
                if self.gemm_convolutions and not torch.is_autocast_enabled(x.device.type):
                    out = _conv2d_gemm(args, kwargs)
                    if out is not None:
                        return out
                if self.exact_zero_patches:
                    return _conv2d(func, args, kwargs)
        return func(*args, **kwargs)


def _plain_float(x: object) -> bool:
    return not _under_functorch() and type(x) is Tensor and x.ndim == 4 and x.dtype in _DTYPES


def _under_functorch() -> bool:
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is None or peek() is not None


def uses_conv(model: nn.Module) -> bool:
    """Whether ``model`` has an ``nn.Conv2d`` (only then may the capture correct convolutions)."""
    return any(isinstance(module, nn.Conv2d) for module in model.modules())
