r"""The capture's audit: proof, on a few examples, that the hooks see every use of every trainable parameter.

The structured engine builds each parameter's per-example gradient from what its module's forward hook records
(the input :math:`A`) and from the gradient :math:`G` with respect to that module's output. A parameter read
anywhere else (a functional call on ``module.weight`` in the parent, a cosine head's normalised weight, a tied or
transposed weight, a standardised convolution weight, a bias added a second time, a forward hook of the user's
that reads the weight, a parametrisation) contributes to the true gradient through a path no hook sees, and the
kernel comes out wrong without any error. So does a model whose examples interact in a batch (the sum trick
then mixes their gradients). No list of patterns can name every such model; a gradient identity can:

.. math:: \sum_i w_i\, \widehat{\nabla_\theta f}(x_i) = \nabla_\theta \sum_i w_i f(x_i)

for every trainable tensor :math:`\theta`, where the left side is built from the captured factors in exactly the
forms the kernel will use (materialised rows, or :math:`R_i^\top L_i` for a structured layer) and the right side
is plain autograd. Random weights :math:`w_i` make a cancelling error improbable. The check runs in float64
on up to :data:`AUDIT_EXAMPLES` examples, so rounding (~1e-15) is far below :data:`AUDIT_TOLERANCE` and any
unseen use large enough to move a float64 kernel by 1e-10 is caught; a model that cannot run in float64 is not
audited and takes the general path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_afterkernel.kernels import _structured as st
from lightning_afterkernel.kernels._model import Outputs, check_logits

AUDIT_EXAMPLES = 4
"""Examples the audit runs on (the first of the chunk the engine probes)."""
AUDIT_TOLERANCE = 1e-10
"""Largest accepted ||implied - autograd|| of a tensor relative to the whole gradient's size (the root sum of squares
over tensors of max(||autograd||, ||implied||)): a miss below it moves the kernel by less than ~2e-10."""
AUDIT_SEED = 20210521
"""Seed of the audit's weights (a private generator: the global random state is not touched)."""


@dataclass
class Probe:
    """The capture of the first :data:`AUDIT_EXAMPLES` examples in float64: what the engine reads the layers'
    shapes and needs from (``captured``, one list per logit; ``eps``: whether the added zeros were needed), and what
    the audit checks."""

    state: dict[str, Tensor]
    fixed: dict[str, Tensor]
    x: Tensor
    captured: list[list[tuple[Tensor, Tensor] | None]]
    eps: bool


def probe_capture(
    model: nn.Module,
    trainable: dict[str, Tensor],
    fixed: dict[str, Tensor],
    layers: list[st.Layer],
    x: Tensor,
    select: Outputs | None = None,
) -> Probe:
    """Capture ``x[:AUDIT_EXAMPLES]`` in float64 for the logits of ``select`` (None: the model's one logit); a model
    that cannot run in float64 raises :class:`~._structured.Unsupported` (unproven is not exact)."""
    select = select or Outputs(1, None, False, False)
    try:
        state = {name: _float64(t) for name, t in trainable.items()}
        fixed = {name: _float64(t) for name, t in fixed.items()}
        x = _float64(x[:AUDIT_EXAMPLES].detach())
        captured, eps = st.capture_any(model, {**state, **fixed}, layers, x, logits=select.logits)
    except (RuntimeError, NotImplementedError, TypeError) as err:  # e.g. an operator without a float64 kernel
        raise st.Unsupported(f"the capture could not be audited in float64 ({type(err).__name__}: {err})") from err
    return Probe(state, fixed, x, captured, eps)


def audit_capture(model: nn.Module, probe: Probe, layers: list[st.Layer], select: Outputs | None = None) -> None:
    """Raise :class:`~._structured.Unsupported` naming the trainable tensor whose gradient the ``probe``'s capture,
    in the forms already chosen for ``layers`` (and the layout of ``select``), misses most, if that is more than
    :data:`AUDIT_TOLERANCE` of the whole gradient."""
    select = select or Outputs(1, None, False, False)
    x, captured = probe.x, probe.captured
    generator = torch.Generator().manual_seed(AUDIT_SEED)
    weights = torch.randn(len(x), select.count, generator=generator, dtype=torch.float64).to(x.device)
    try:
        truth = _autograd(model, probe.state, probe.fixed, x, weights, select)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        raise st.Unsupported(f"the capture could not be audited in float64 ({type(err).__name__}: {err})") from err
    blank = st.new_factors(layers, captured[0], len(x), weights, select.count, select.stacked)
    factors = st.factors(layers, captured, blank)
    implied: dict[str, Tensor] = {}
    for c in range(select.count):
        for name, part in _implied(layers, factors.logit(c), weights[:, c]).items():
            implied[name] = implied[name] + part if name in implied else part
    names = list(truth)
    reference = torch.stack([truth[name].square().sum() for name in names])
    got = torch.stack([implied[name].square().sum() if name in implied else reference.new_zeros(()) for name in names])
    missed = torch.stack([(implied.get(name, 0) - truth[name]).square().sum() for name in names])
    scale = float(torch.maximum(reference, got).sum().sqrt())  # the whole gradient's size, the kernel's scale
    worst = int(missed.argmax())
    if float(missed[worst].sqrt()) > AUDIT_TOLERANCE * scale:
        share = float(missed[worst].sqrt()) / max(float(reference[worst].sqrt()), 1e-300)
        raise st.Unsupported(_reason(names[worst], layers, captured[0], share))


def _float64(tensor: Tensor) -> Tensor:
    return tensor.detach().to(torch.float64) if tensor.is_floating_point() else tensor.detach()


def _autograd(
    model: nn.Module, state: dict[str, Tensor], fixed: dict[str, Tensor], x: Tensor, weights: Tensor, select: Outputs
) -> dict[str, Tensor]:
    """The gradient of sum_i sum_c w_ic f_c(x_i) over the selected logits c with respect to every trainable tensor
    (zeros where it is unused)."""
    leaves = {name: t.clone().requires_grad_(True) for name, t in state.items()}
    out = functional_call(model, {**leaves, **fixed}, (x.clone(),))  # (a forward may change its input in place)
    check_logits(out, x)
    out = out.reshape(len(x), -1) if select.logits is None else out.reshape(len(x), -1)[:, list(select.logits)]
    grads = torch.autograd.grad((weights * out).sum(), list(leaves.values()), allow_unused=True)
    return {name: torch.zeros_like(t) if g is None else g for (name, t), g in zip(leaves.items(), grads, strict=True)}


def _implied(layers: list[st.Layer], factors: st.Factors, weights: Tensor) -> dict[str, Tensor]:
    """For each trainable tensor the layers own, sum_i w_i J_i from the factors, in the tensor's shape."""
    implied: dict[str, Tensor] = {}
    pairs, offset = iter(factors.pairs), 0
    for layer in layers:
        keys = [key for key in (layer.weight, layer.bias) if key is not None]
        shapes = [getattr(layer.module, key.rsplit(".", 1)[-1]).shape for key in keys]
        if layer.structured:
            left, right = next(pairs)
            weighted = (right * weights[:, None, None]).flatten(0, 1)  # sum_i w_i R_i^T L_i; bias: last column
            summed = weighted.mT @ left.flatten(0, 1)
            parts = [summed[:, : left.shape[-1] - (layer.bias is not None)]]
            if layer.bias is not None:
                parts.append(summed[:, -1])
        else:
            width = st.n_materialised(layer)
            block = weights @ factors.jac[:, offset : offset + width]
            offset += width
            parts = list(block.split([shape.numel() for shape in shapes]))
        for key, shape, part in zip(keys, shapes, parts, strict=True):
            implied[key] = part.reshape(shape)
    return implied


def _reason(name: str, layers: list[st.Layer], captured: list, relative: float) -> str:
    """Why the capture misses part of ``name``'s gradient, as far as the records tell."""
    layer, io = next((lay, io) for lay, io in zip(layers, captured, strict=True) if name in (lay.weight, lay.bias))
    if io is None:
        how = (
            f"its module {layer.name} is never called, so it is read outside it (e.g. a functional call on "
            f"{layer.name}.{name.rsplit('.', 1)[-1]}, a normalised or standardised weight, a parametrisation)"
        )
    else:
        how = (
            f"it is also used outside its module {layer.name}'s own call (e.g. a tied or transposed weight, a "
            "reused bias, a forward hook reading it), or the model's examples interact within a batch"
        )
    return f"parameter {name} is not seen whole by the layer hooks ({relative:.1%} of its gradient missed): {how}"
