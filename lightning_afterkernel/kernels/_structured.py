r"""Per-layer factors of the empirical NTK, captured with hooks from one batched forward and backward.

The NTK is a sum over parameter tensors, :math:`K = \sum_\ell J_\ell J_\ell^\top`, and for the layers
handled here :math:`J_\ell` is a simple function of the layer's input :math:`A` and of the gradient
:math:`G` of the logit with respect to the layer's output. Both come, for a whole chunk of examples,
from ONE forward and backward pass of :math:`\sum_i f(x_i)`: a forward hook records :math:`A` and the
layer's output, and :math:`G` is the gradient with respect to that output (the input is made to require a
gradient, so every output is in the autograd graph; nothing below the first layer is differentiated). If an
output is changed in place later (``ReLU(inplace=True)``) or does not depend on the input, the capture is
redone with a zero tensor :math:`\epsilon` added to every output, and :math:`G` is the gradient with respect to
:math:`\epsilon` (exact too, but the zeros and additions cost ~4% of a VGG kernel on CPU). This "sum trick"
is exact because, in eval mode, examples do not interact.

The chunk is copied to the contiguous (NCHW) format first, whatever the caller's strides. oneDNN picks its
convolution by the input's strides, and single-channel images made from (N, H, W, 1) arrays (the real MNIST
tensors of :mod:`lightning_afterkernel.data`) have the strides of channels-last, which PyTorch also calls
contiguous. The channels-last convolutions round differently: on real MNIST their activations were twice as far
from float64 (4.3e-7 against 2.3e-7 after the fourth convolution of the paper's VGG), and on 200 training by 8 x 50
test images a max-pool near-tie flipped in three images, so the float32 kernel was 2.0e-6 to 1.2e-4 from the
float64 one (the tutorial method, whose ``vmap`` reshapes to NCHW, 6e-8). With NCHW chunks it is 8.6-8.9e-8.

Each layer's contribution is then kept in one of two forms, whichever is cheaper for the kernel:

- materialised: the per-example gradients themselves (a row of width = number of parameters), so the
  layer's kernel is an ordinary Gram matrix;
- structured: two factors :math:`L_i` (T x d) and :math:`R_i` (T x p) per example with
  :math:`K(i, j) = \sum_{t, s} (L_i L_j^\top)_{ts} (R_i R_j^\top)_{ts}` (Novak et al. 2022, "Fast Finite
  Width Neural Tangent Kernel"). For a Linear layer on vectors T = 1, L = [A, 1] (the 1 carries the bias)
  and R = G, so :math:`K = (L L^\top) \odot (G G^\top)`; for a convolution L holds the im2col patches.

Supported: ``Linear`` (on inputs of any rank), ``Conv2d`` (stride, padding incl. ``"same"`` and
non-zero padding modes, dilation, groups), ``BatchNorm1d/2d/3d`` in eval mode with running statistics, with
their own ``forward`` (their forward hooks may change the output: the capture's hook runs first). Anything else
that owns a trainable parameter (a subclass that overrides ``forward`` included), global forward hooks, a
supported module called more than once per forward, a parameter shared between modules, a module called on a
tensor without the batch as its first dimension, or an in-place change of a recorded input makes :func:`plan`/
:func:`capture` raise :class:`Unsupported`, and the caller takes the general path. What no such rule can see (a
parameter read outside its module's own call) is caught by the audit of :mod:`._audit`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.kernels._layouts import CaptureMode, inexact_convolutions, uses_conv
from lightning_afterkernel.kernels._model import check_logits

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
GEMM_CONVOLUTIONS = True
"""Whether the capture computes convolutions as im2col patches times the weight wherever PyTorch's own may
not be direct ones (any device but a CPU with oneDNN; see :class:`~._layouts.CaptureMode`) and the device type is
not in :data:`LIBRARY_CONVOLUTION_DEVICES`; if not, those convolutions are only made exact over all-zero
patches."""
LIBRARY_CONVOLUTION_DEVICES = frozenset({"cuda"})
"""Device types whose own convolutions the capture keeps, made exact over all-zero patches, instead of im2col. On
an H200 cuDNN's with that correction put the paper's VGG kernel of the full MNIST split as close to float64 as
im2col did (3.0e-5, the tutorial's) in 1.05 s instead of 1.24 s, and on random CIFAR-shaped images 3.9e-6 from
float64 (the tutorial's, whose convolutions are cuDNN's too) where im2col was 3.4e-5 (a max-pool near-tie).
CPUs without oneDNN keep im2col: NNPACK's tiles with the correction alone were 6.1e-5 off on real MNIST."""
ELEMENTWISE_COST = 4.0
"""Cost of one elementwise multiply-accumulate on an n x n tile, in units of one matmul multiply-add
(elementwise work is memory-bound); used when choosing a layer's form."""
GROUPED_CONV_DEVICES = ("cpu",)
"""Devices on which per-example convolution weight gradients come from one grouped convolution."""


class Unsupported(Exception):
    """The model is outside what the structured engine handles exactly; the message says why."""


@dataclass
class Layer:
    """One parametrised module and the trainable tensors it owns (state-dict keys, or None if frozen)."""

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None
    structured: bool = False
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-example shapes from the probe

    @property
    def kind(self) -> str:
        if isinstance(self.module, nn.Linear):
            return "linear"
        if isinstance(self.module, nn.Conv2d):
            return "conv2d"
        return "batchnorm"


@dataclass
class Factors:
    """The NTK factors of a block of examples: materialised gradients and structured (L, R) pairs.

    With ``logits`` = s > 1 selected outputs, each example's factors hold all s logits' gradients, in one of two
    layouts: side by side (``stacked=False``, the trace kernel: one row per example, the materialised row and R
    widened s times, logit after logit, so that a row product sums over the logits), or one row per example and
    logit (``stacked=True``, the full kernel: rows i s + c, L repeated, so that row products give every pair of
    logits). :meth:`logit` is the one-logit view of logit c in either layout."""

    jac: Tensor | None  # (rows, P_materialised)
    pairs: list[tuple[Tensor, Tensor]]  # each (rows, T, d), (rows, T, p)
    logits: int = 1
    stacked: bool = False

    @property
    def n_rows(self) -> int:
        return len(self.jac) if self.jac is not None else len(self.pairs[0][0])

    @property
    def per_example(self) -> int:
        """Rows per example: the logits when stacked, else 1."""
        return self.logits if self.stacked else 1

    def __len__(self) -> int:
        return self.n_rows // self.per_example

    def rows(self, index: slice) -> Factors:
        """The factors of the examples ``index`` (a slice of examples, whatever the layout)."""
        start, stop, _ = index.indices(len(self))
        index = slice(start * self.per_example, stop * self.per_example)
        return replace(
            self,
            jac=None if self.jac is None else self.jac[index],
            pairs=[(left[index], right[index]) for left, right in self.pairs],
        )

    def logit(self, c: int) -> Factors:
        """The one-logit factors (views) of the c-th selected logit."""
        if self.logits == 1:
            return self
        s = self.logits
        if self.stacked:
            jac = None if self.jac is None else self.jac[c::s]
            pairs = [(left[c::s], right[c::s]) for left, right in self.pairs]
        else:
            width = None if self.jac is None else self.jac.shape[1] // s
            jac = None if self.jac is None else self.jac[:, c * width : (c + 1) * width]
            pairs = [
                (left, right[..., c * (right.shape[-1] // s) : (c + 1) * (right.shape[-1] // s)])
                for left, right in self.pairs
            ]
        return Factors(jac, pairs)


def plan(model: nn.Module, trainable: set[str]) -> list[Layer]:
    """The supported layers that own the ``trainable`` parameters; raise :class:`Unsupported` if any
    trainable parameter lives elsewhere or is shared."""
    owners: dict[str, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(str(id(parameter)), []).append(name)
    for names in owners.values():
        if len(names) > 1 and trainable.intersection(names):
            raise Unsupported(f"parameter shared between {', '.join(names)}")
    layers, covered = [], set()
    for module_name, module in model.named_modules():
        own = {n for n, _ in module.named_parameters(recurse=False)}
        keys = {n: f"{module_name}.{n}" if module_name else n for n in own}
        mine = {n for n, key in keys.items() if key in trainable}
        if not mine:
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d, *_BATCHNORMS)) or not own <= {"weight", "bias"}:
            raise Unsupported(
                f"module {module_name or '<root>'} ({type(module).__name__}) has trainable parameters "
                f"({', '.join(sorted(keys[n] for n in mine))}) the structured engine does not handle (it takes "
                "Linear, Conv2d and BatchNorm layers with their own weight and bias only)"
            )
        base = next(cls for cls in (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm) if isinstance(module, cls))
        if type(module).forward is not base.forward:
            raise Unsupported(
                f"module {module_name or '<root>'} ({type(module).__name__}) overrides {base.__name__}.forward, so "
                "its output need not be the layer's own"
            )
        if nn.modules.module._global_forward_hooks:  # they run before the capture's own hook, which sees the rest
            raise Unsupported("global forward hooks (register_module_forward_hook) may change the layers' outputs")
        if isinstance(module, _BATCHNORMS) and (module.running_mean is None or module.running_var is None):
            raise Unsupported(
                f"{module_name} ({type(module).__name__}) has no running statistics, so in eval mode it "
                "normalises with batch statistics and examples interact"
            )
        layers.append(
            Layer(
                module_name,
                module,
                keys["weight"] if "weight" in mine else None,
                keys["bias"] if "bias" in mine else None,
            )
        )
        covered.update(keys[n] for n in mine)
    missing = trainable - covered
    if missing:
        raise Unsupported(f"parameters {sorted(missing)} belong to no supported module")
    return layers


@dataclass
class _Record:
    calls: int = 0
    input: Tensor | None = None
    version: int = 0
    target: Tensor | None = None  # the tensor G is the gradient for: the output itself, or the added zeros
    output_version: int = 0


class OutputChanged(Exception):
    """A recorded output was changed in place or does not depend on the input: capture with ``eps=True``."""


@contextmanager
def _hooks(layers: list[Layer], eps: bool) -> Iterator[list[_Record]]:
    records = [_Record() for _ in layers]
    handles = []
    for layer, record in zip(layers, records, strict=True):

        def hook(module: nn.Module, args: tuple, output: Tensor, layer: Layer = layer, record: _Record = record):
            if record.calls:
                raise Unsupported(f"module {layer.name} is called more than once in one forward")
            if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                raise Unsupported(f"module {layer.name} is not called with one positional tensor")
            record.calls += 1
            record.input = args[0].detach()
            record.version = args[0]._version
            if not eps:
                record.target, record.output_version = output, output._version
                return None
            record.target = torch.zeros_like(output, requires_grad=True)
            return output + record.target

        # First among the module's forward hooks: it sees the layer's own output, whatever later hooks make of it.
        handles.append(layer.module.register_forward_hook(hook, prepend=True))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def capture(
    model: nn.Module, state: dict[str, Tensor], layers: list[Layer], x: Tensor, eps: bool = False
) -> list[tuple[Tensor, Tensor] | None]:
    """Each layer's (input A, output gradient G) for the batch ``x``; None for a layer not called.

    ``state`` holds detached tensors, so autograd only differentiates with respect to the layers' outputs
    (``eps=False``, for a floating ``x``) or the hooks' zero tensors (``eps=True``): a backward pass without any
    weight gradient.

    Raises:
        OutputChanged: (``eps=False``) an output was changed in place or does not depend on ``x``.
        Unsupported: see the module docstring.
    """
    return capture_logits(model, state, layers, x, None, eps)[0]


def capture_logits(
    model: nn.Module,
    state: dict[str, Tensor],
    layers: list[Layer],
    x: Tensor,
    logits: Sequence[int] | None,
    eps: bool = False,
) -> list[list[tuple[Tensor, Tensor] | None]]:
    """:func:`capture` for each of the ``logits`` (column indices of an (n, k) output; None: the model's one
    logit, summed as it is): one list per logit, sharing the inputs A. One forward, one backward per logit."""
    eps = eps or not x.is_floating_point()
    with _hooks(layers, eps) as records:
        # A copy of the chunk, so that a model changing its input in place changes neither the caller's tensor
        # nor another capture's; not a leaf, so that autograd allows that change with a gradient required. In
        # the contiguous (NCHW) format whatever the caller's strides (see the module docstring).
        inp = x.detach() if eps else x.detach().requires_grad_(True)
        inp = inp.clone(memory_format=torch.contiguous_format)
        conv = uses_conv(model)
        exact_zero_patches = conv and inexact_convolutions(x.device)
        gemm = exact_zero_patches and GEMM_CONVOLUTIONS and x.device.type not in LIBRARY_CONVOLUTION_DEVICES
        # (the mode intercepts every torch call of the forward, a few microseconds each: only when it has work)
        mode = CaptureMode(exact_zero_patches, gemm) if exact_zero_patches else None
        with mode or nullcontext():
            out = functional_call(model, state, (inp,))
        k = check_logits(out, x)
        if logits is not None and not all(0 <= c < k for c in logits):
            raise ConfigurationError(f"outputs {list(logits)} are not logits of a model with {k} (0 to {k - 1}).")
        live = [r for r in records if r.calls]
        for layer, record in zip(layers, records, strict=True):
            if record.calls and (record.input.shape[:1] != x.shape[:1] or record.target.shape[:1] != x.shape[:1]):
                raise Unsupported(
                    f"module {layer.name} is called on a tensor whose first dimension is not the batch's "
                    f"({tuple(record.input.shape)} for a batch of {len(x)}): the sum trick needs per-example rows"
                )
        if not eps and any(not r.target.requires_grad or r.target._version != r.output_version for r in live):
            raise OutputChanged("an output is changed in place, or does not depend on the input")
        seeds = [out.sum()] if logits is None else [out.reshape(len(x), -1)[:, c].sum() for c in logits]
        targets = [r.target for r in live]
        grads = [
            torch.autograd.grad(seed, targets, allow_unused=True, retain_graph=i + 1 < len(seeds)) if live else []
            for i, seed in enumerate(seeds)
        ]
    for layer, record in zip(layers, records, strict=True):
        if record.calls and record.input._version != record.version:
            raise Unsupported(f"the input of {layer.name} is modified in place after the layer reads it")
    per_logit = []
    for logit_grads in grads:
        by_record = dict(zip(map(id, live), logit_grads, strict=True))
        per_logit.append([_recorded(record, by_record) for record in records])
    return per_logit


def _recorded(record: _Record, grads: dict[int, Tensor | None]) -> tuple[Tensor, Tensor] | None:
    """A layer's (A, G) for one logit (G zero where the logit does not depend on the layer); None if not called."""
    if not record.calls:
        return None
    grad = grads[id(record)]
    return record.input, torch.zeros_like(record.target) if grad is None else grad


def capture_any(
    model: nn.Module,
    state: dict[str, Tensor],
    layers: list[Layer],
    x: Tensor,
    eps: bool = False,
    logits: Sequence[int] | None = None,
) -> tuple[list[list[tuple[Tensor, Tensor] | None]], bool]:
    """:func:`capture_logits`, redone with ``eps=True`` when direct gradients are impossible
    (:class:`OutputChanged`); returns (captured per logit, whether the zeros were used), so that a caller can keep
    to the mode that worked."""
    if not eps:
        try:
            return capture_logits(model, state, layers, x, logits), False
        except OutputChanged:  # e.g. an output changed in place, for some inputs or for all
            pass
    return capture_logits(model, state, layers, x, logits, eps=True), True


# ------------------------------------------------------------------ per-layer forms
def _patches(layer: Layer, a: Tensor) -> Tensor:
    """im2col of a Conv2d input: (b, C_in k_h k_w, T), padding (of any mode) applied first."""
    conv = layer.module
    pad = conv._reversed_padding_repeated_twice
    if any(pad):
        a = F.pad(a, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    return F.unfold(a, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)


def _conv_weight_grads(layer: Layer, a: Tensor, g: Tensor) -> Tensor:
    """Per-example Conv2d weight gradients, (b, C_out C_in / groups k_h k_w) or (b, C_out, C_in / groups, k_h, k_w).

    On the devices in :data:`GROUPED_CONV_DEVICES` (oneDNN on CPU): the weight gradient of one convolution
    whose groups are the examples (what ``vmap`` does for convolutions, without its copies), in the contiguous
    format. Elsewhere (cuDNN is slow with thousands of groups): im2col patches and one batched matmul,
    G_i^T P_i."""
    conv = layer.module
    b = len(a)
    if a.device.type not in GROUPED_CONV_DEVICES:
        patches = _patches(layer, a)  # (b, C_in k k, T)
        patches = patches.reshape(b, conv.groups, -1, patches.shape[-1])
        right = g.reshape(b, conv.groups, -1, patches.shape[-1])
        return (right @ patches.mT).reshape(b, -1)
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        pad = conv._reversed_padding_repeated_twice
        a = F.pad(a, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        padding = (0, 0)
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, b * conv.out_channels, *g.shape[2:]),
        a.reshape(1, b * a.shape[1], *a.shape[2:]),
        a.new_empty(b * conv.out_channels, *conv.weight.shape[1:]),
        None,
        list(conv.stride),
        list(padding),
        list(conv.dilation),
        False,
        [0, 0],
        b * conv.groups,
        [False, True, False],
    )
    return grad_weight.view(b, conv.out_channels, *conv.weight.shape[1:])


def _normalised(layer: Layer, a: Tensor) -> Tensor:
    bn = layer.module
    shape = (1, -1) + (1,) * (a.ndim - 2)
    mean = bn.running_mean.to(a.dtype).reshape(shape)
    var = bn.running_var.to(a.dtype).reshape(shape)
    return (a - mean) * torch.rsqrt(var + bn.eps)


def dims(layer: Layer, a: Tensor, g: Tensor) -> tuple[int, int, int]:
    """(T, d, p) of the layer for one example: positions, left width (incl. a bias column), right width."""
    bias = int(layer.bias is not None)
    if layer.kind == "linear":
        return math.prod(a.shape[1:-1]), a.shape[-1] + bias, g.shape[-1]
    if layer.kind == "conv2d":
        conv = layer.module
        d = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
        return math.prod(g.shape[2:]), d + bias, conv.out_channels
    return 0, 0, 0


def n_materialised(layer: Layer) -> int:
    """Number of gradient entries the layer contributes in materialised form."""
    keys = [key for key in (layer.weight, layer.bias) if key is not None]
    return sum(getattr(layer.module, key.rsplit(".", 1)[-1]).numel() for key in keys)


def choose_forms(
    layers: list[Layer],
    probe: list[tuple[Tensor, Tensor] | None],
    pairs: float,
    examples: float,
    force: str | None,
    widen: int = 1,
) -> None:
    """Set each layer's ``structured`` flag: the cheaper form for ``pairs`` products of factor rows of
    ``examples`` rows (n^2 / 2 and n for a symmetric Gram matrix, n and 2 n in paired mode; times s^2 and s for s
    stacked logits), each row ``widen`` logits wide (side by side: the trace kernel of s logits), or ``force``d."""
    for layer, io in zip(layers, probe, strict=True):
        layer.structured = False
        if io is None or layer.kind == "batchnorm" or layer.weight is None:
            continue
        if layer.kind == "conv2d" and layer.module.groups != 1:
            continue
        if force is not None:
            layer.structured = force == "structured"
            continue
        t, d, p = dims(layer, *io)
        materialised = (pairs * n_materialised(layer) + examples * t * (d - 1) * p) * widen
        structured = pairs * t * t * (d + p * widen + ELEMENTWISE_COST)
        layer.structured = structured < materialised


def new_factors(
    layers: list[Layer],
    probe: list[tuple[Tensor, Tensor] | None],
    b: int,
    like: Tensor,
    logits: int = 1,
    stacked: bool = False,
) -> Factors:
    """Uninitialised :class:`Factors` for ``b`` examples of a model whose capture gave ``probe`` (one logit's), for
    ``logits`` logits in the ``stacked`` or side-by-side layout."""
    rows, wide = (b * logits, 1) if stacked else (b, logits)
    n_jac = sum(n_materialised(layer) for layer in layers if not layer.structured) * wide
    pairs = []
    for layer, io in zip(layers, probe, strict=True):
        if layer.structured:
            t, d, p = dims(layer, *io)
            pairs.append((like.new_empty(rows, t, d), like.new_empty(rows, t, p * wide)))
    return Factors(like.new_empty(rows, n_jac) if n_jac else None, pairs, logits, stacked and logits > 1)


def empty_factors(sample: Factors, b: int) -> Factors:
    """Uninitialised :class:`Factors` for ``b`` examples, shaped (and laid out) like ``sample``."""
    rows = b * sample.per_example
    jac = None if sample.jac is None else sample.jac.new_empty(rows, sample.jac.shape[1])
    pairs = [(a.new_empty(rows, *a.shape[1:]), g.new_empty(rows, *g.shape[1:])) for a, g in sample.pairs]
    return replace(sample, jac=jac, pairs=pairs)


def factors(layers: list[Layer], captured: list[list[tuple[Tensor, Tensor] | None]], out: Factors) -> Factors:
    """Write the factors of a captured block (one capture per logit, from :func:`capture_logits`) into ``out``
    (from :func:`empty_factors`, with as many logits) and return it."""
    for c, logit in enumerate(captured):
        _logit_factors(layers, logit, out.logit(c), left=c == 0 or out.stacked)
    return out


def _logit_factors(layers: list[Layer], captured: list[tuple[Tensor, Tensor] | None], out: Factors, left: bool) -> None:
    """Write one logit's factors into ``out`` (its one-logit view); the structured layers' L only if ``left``
    (side by side, the logits share it)."""
    pairs = iter(out.pairs)
    offset = 0
    for layer, io in zip(layers, captured, strict=True):
        if layer.structured:
            if io is None:
                raise Unsupported(f"layer {layer.name} is called for some inputs and not for others")
            _structured(layer, *io, *next(pairs), left_too=left)
            continue
        width = n_materialised(layer)
        if io is None:
            out.jac[:, offset : offset + width] = 0
        else:
            start = offset
            for part in _materialised(layer, *io):  # each (b, ...), in any memory layout
                out.jac[:, start : start + part[0].numel()].view(part.shape).copy_(part)
                start += part[0].numel()
        offset += width


def _structured(layer: Layer, a: Tensor, g: Tensor, left: Tensor, right: Tensor, *, left_too: bool = True) -> None:
    """Write the layer's (L, R) factors, (b, T, d) and (b, T, p), into ``left`` (if ``left_too``) and ``right``."""
    b = len(a)
    if layer.kind == "linear":
        g = g.reshape(b, -1, g.shape[-1])
        a = a.reshape(b, -1, a.shape[-1]) if left_too else None
    else:
        g = g.flatten(2).mT
        a = _patches(layer, a).mT if left_too else None
    if left_too:
        left[..., : a.shape[-1]] = a
        if layer.bias is not None:
            left[..., -1] = 1
    right.copy_(g)


def _materialised(layer: Layer, a: Tensor, g: Tensor) -> list[Tensor]:
    """Per-example gradients of the layer's trainable tensors, weight first."""
    b = len(a)
    parts = []
    if layer.kind == "linear":
        left, right = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
        if layer.weight is not None:
            parts.append(right.mT @ left)
        if layer.bias is not None:
            parts.append(right.sum(1))
    elif layer.kind == "conv2d":
        if layer.weight is not None:
            parts.append(_conv_weight_grads(layer, a, g))
        if layer.bias is not None:
            parts.append(g.sum((2, 3)))
    else:
        spatial = tuple(range(2, g.ndim))
        if layer.weight is not None:
            parts.append((g * _normalised(layer, a)).sum(spatial) if spatial else g * _normalised(layer, a))
        if layer.bias is not None:
            parts.append(g.sum(spatial) if spatial else g)
    return parts
