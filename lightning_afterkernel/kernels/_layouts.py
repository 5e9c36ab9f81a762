"""Operators re-done inside the capture: convolutions computed directly (im2col times the weight) where PyTorch's
may not be direct ones, max-pooling channels-last on CPU, and on CPU convolutions' input gradients by NNPACK (see
:class:`CaptureMode`).

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

*Max-pooling channels-last on CPU.* PyTorch's CPU max-pooling in NCHW runs a scalar loop per output element; in
channels-last it is vectorised over the channels. On the paper's VGG (2-core AMD EPYC, one thread) a 2 x 2 pool
of 35 x 38 x 28 x 28 float32 activations took 5.6 ms NCHW and 0.6 ms channels-last, 0.35 ms for the
conversion: the pooling was ~7% of the kernel's capture. Max-pooling only selects, so the values, the indices
(flat ``h * W + w`` per plane in both layouts, first maximum in the window's scan order, NaN propagating) and
the gradients (PyTorch's own NCHW backward, scattering with those indices) are bitwise those of the NCHW
operator; the tests check it.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

MIN_CHANNELS = 4
"""Fewer channels leave the vectorised loop little to do: with 1-3 channels channels-last was 1.2-1.4x slower
(35 x C x 28 x 28 and 32 x 32, float32 and float64), from 4 channels 1.3-4x faster."""
_SIGNATURE = inspect.signature(F.max_pool2d_with_indices)
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


def nnpack_input_grads_available() -> bool:
    """Whether this PyTorch has NNPACK for this CPU (used by :class:`CaptureMode`'s ``nnpack_input_grads``)."""
    try:
        return bool(torch._nnpack_available())
    except (AttributeError, RuntimeError):
        return False


def _nnpack_geometry(args: tuple, kwargs: dict) -> tuple[tuple[int, int], Tensor] | None:
    """The input-gradient padding and the weight of an ``F.conv2d`` call that :class:`_Conv2dNNPACKInputGrad`
    handles, or None: a float32 CPU input of two examples or more that requires a gradient, a frozen 3 x 3
    weight and bias, stride 1, dilation 1, one group, padding 0-2 (so the input gradient is a 3 x 3 convolution
    with padding 2 - p, as large as the input), and an input size for which NNPACK picks its 16 x 16 FFT tiles
    (:func:`fft_tiles`)."""
    a = _conv_call(args, kwargs)
    x, weight, bias = a["input"], a["weight"], a["bias"]
    if not (
        type(x) is Tensor
        and x.ndim == 4
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.requires_grad
        and len(x) >= 2  # one example: NNPACK's per-image path, whose tiles were 13x less accurate (2.7e-6)
        and type(weight) is Tensor
        and tuple(weight.shape[-2:]) == (3, 3)
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
        and a["groups"] == 1
        and _pair(a["stride"]) == (1, 1)
        and _pair(a["dilation"]) == (1, 1)
    ):
        return None
    padding = a["padding"]
    pads = {"valid": (0, 0), "same": (1, 1)}.get(padding) if isinstance(padding, str) else _pair(padding)
    if pads is None or not all(0 <= p <= 2 for p in pads) or not fft_tiles(*x.shape[-2:]):
        return None
    return (2 - pads[0], 2 - pads[1]), weight


def fft_tiles(height: int, width: int) -> bool:
    """Whether NNPACK computes a 3 x 3 convolution with an output of this size by 16 x 16 FFT tiles (its rule:
    when 8 x 8 tiles would be more than 4 times as many) rather than by Winograd's 8 x 8 ones. Only the FFT's
    gradients are as accurate as oneDNN's: 1.6-3.1e-7 against 0.9-2.2e-7 from float64 (relative Frobenius;
    sizes 14-56, 3-128 channels), where the Winograd tiles gave 1.6-3.2e-6 (sizes 6-20)."""
    return math.ceil(height / 6) * math.ceil(width / 6) > 4 * math.ceil(height / 14) * math.ceil(width / 14)


class _Conv2dNNPACKInputGrad(torch.autograd.Function):
    """``F.conv2d`` itself (oneDNN) forward; its input gradient by NNPACK's FFT convolution of the output
    gradient with the flipped, transposed kernel (see :class:`CaptureMode`)."""

    @staticmethod
    def forward(ctx, func, args: tuple, kwargs: dict, pads: tuple[int, int], x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(weight)  # (so that a change in place before the backward is an error, as in PyTorch's)
        ctx.pads = pads
        return func(x.detach(), *args[1:], **kwargs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        flipped = weight.transpose(0, 1).flip(-2, -1).contiguous()
        try:
            grad_input = torch._nnpack_spatial_convolution(
                grad.contiguous(), flipped, grad.new_zeros(flipped.shape[0]), list(ctx.pads), [1, 1]
            )
        except RuntimeError:  # NNPACK refused (e.g. out of memory for its workspace): oneDNN's, as without the mode
            grad_input = F.conv_transpose2d(grad, weight, padding=(2 - ctx.pads[0], 2 - ctx.pads[1]))
        return (None, None, None, None, grad_input, None)


class CaptureMode(TorchFunctionMode):
    """The capture's operators: with ``gemm_convolutions``, ``F.conv2d`` (and so ``nn.Conv2d``) on 4-D
    float32/float64 inputs as im2col patches times the weight (:func:`_conv2d_gemm`), outside autocast; with
    ``exact_zero_patches``, the other such convolutions exact over all-zero patches (:func:`_conv2d`); with
    ``nnpack_input_grads``, the input gradients of float32 CPU 3 x 3 convolutions by NNPACK
    (:class:`_Conv2dNNPACKInputGrad`); with ``pool_channels_last``, ``F.max_pool2d`` (and so ``nn.MaxPool2d``)
    on a contiguous 4-D float32/float64 CPU tensor with at least :data:`MIN_CHANNELS` channels in channels-last.
    Every other call, and every call under ``vmap``/``grad`` inside the forward, is PyTorch's own.

    *NNPACK input gradients.* The forward convolutions stay oneDNN's: their rounding decides which ReLU gates
    and max-pool choices flip between float32 and float64, and it is the tutorial method's rounding too. The
    backward only carries gradients through decisions already made, so there any accurate algorithm will do.
    NNPACK's FFT convolution (PyTorch's own CPU convolution when oneDNN is off), of the output gradient with the
    flipped, transposed kernel, took 0.6x the time of oneDNN's input gradient for the paper's VGG layers on
    MNIST (35 examples, one thread: 38 -> 38 channels at 28 x 28 7.1-7.6 ms against 12.0 ms; 38 -> 76 and
    76 -> 76 at 14 x 14 2.4 and 4.4-4.9 ms against 4.4 and 7.3 ms), with the same error against float64
    (2.2-2.5e-7 against 2.0-2.1e-7, relative Frobenius; the FFT's error is relative to the largest values in
    each 16 x 16 tile rather than to each entry, so an entry 1e4 times smaller than its tile's largest came out
    2e-4 from float64, normwise nothing); on that VGG the whole kernel took 6.5% less time.
    oneDNN pads channels to blocks of 16 (38 to 48), NNPACK does not. NNPACK has one thread pool per process,
    sized by the thread count of its first caller and locked while it runs: the capture asks for these
    gradients only on threads with one intra-op thread (the concurrent capture's workers on a 2-core CPU), where
    the pool, created there, runs each call in its caller's thread."""

    def __init__(
        self,
        pool_channels_last: bool = False,
        exact_zero_patches: bool = True,
        nnpack_input_grads: bool = False,
        gemm_convolutions: bool = False,
    ) -> None:
        super().__init__()
        self.pool_channels_last, self.exact_zero_patches = pool_channels_last, exact_zero_patches
        self.gemm_convolutions = gemm_convolutions
        # (availability also initialises NNPACK, which its convolution needs)
        self.nnpack_input_grads = (
            nnpack_input_grads and not (exact_zero_patches or gemm_convolutions) and nnpack_input_grads_available()
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if func is F.conv2d and _plain_float(x):
            if self.gemm_convolutions and not torch.is_autocast_enabled(x.device.type):
                out = _conv2d_gemm(args, kwargs)
                if out is not None:
                    return out
            if self.exact_zero_patches:
                return _conv2d(func, args, kwargs)
        if (
            self.nnpack_input_grads
            and func is F.conv2d
            and args
            and not _under_functorch()
            and not torch.is_autocast_enabled("cpu")  # (NNPACK takes float32 gradients only)
        ):
            geometry = _nnpack_geometry(args, kwargs)
            if geometry is not None:
                pads, weight = geometry
                return _Conv2dNNPACKInputGrad.apply(func, args, kwargs, pads, args[0], weight)
        if self.pool_channels_last and (func is F.max_pool2d or func is F.max_pool2d_with_indices):
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


def _plain_float(x: object) -> bool:
    return not _under_functorch() and type(x) is Tensor and x.ndim == 4 and x.dtype in _DTYPES


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


def uses_conv(model: nn.Module) -> bool:
    """Whether ``model`` has an ``nn.Conv2d`` (only then may the capture correct convolutions)."""
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


def uses_max_pool(model: nn.Module) -> bool:
    """Whether ``model`` has an ``nn.MaxPool2d`` (only then does the capture pool channels-last)."""
    return any(isinstance(module, nn.MaxPool2d) for module in model.modules())
