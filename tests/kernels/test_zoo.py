"""Networks this project did not write, against the float64 reference: every one either gives the exact kernel
through the fast engine, or falls back to the general path with a warning that names the parameter and why.

The first group reuses parameters outside their modules' own calls (cosine heads, tied and transposed weights,
weight standardisation, reused biases, parametrisations, hooks); hook-based engines get these silently wrong
(nngeometry #94). The second group is torchvision's ResNet-18 and MobileNetV3 with calibrated BatchNorm statistics
and a small transformer encoder."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from lightning_afterkernel.errors import ModelError
from lightning_afterkernel.kernels import empirical_ntk, empirical_ntk_train_test, empirical_ntk_views, reference_ntk
from lightning_afterkernel.kernels._audit import AUDIT_EXAMPLES, audit_capture, probe_capture

FALLBACK = "general per-example-gradient path"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _body() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh())


class CosineHead(nn.Module):
    """Cosine classifier: the head's weight is normalised in the parent; ``fc`` itself is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.fc = _body(), nn.Linear(6, 1)

    def forward(self, x):
        return 3.0 * F.linear(F.normalize(self.body(x), dim=1), F.normalize(self.fc.weight, dim=1))


class TiedTransposed(nn.Module):
    """A decoder that reuses the encoder's weight transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.head = nn.Linear(12, 5), nn.Linear(12, 1)

    def forward(self, x):
        h = torch.tanh(self.enc(x.flatten(1)))
        return self.head(torch.tanh(F.linear(h, self.enc.weight.t())))


class StandardisedConv(nn.Module):
    """Weight standardisation in the parent before ``F.conv2d(x, w, self.conv.bias)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 3, 3, padding=1), nn.Linear(3 * 3 * 4, 1)

    def forward(self, x):
        w = self.conv.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self.head(torch.relu(F.conv2d(x, w, self.conv.bias, padding=1)).flatten(1))


class ReusedBias(nn.Module):
    """A Linear's bias added once more elsewhere in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 6), nn.Linear(6, 1)
        nn.init.normal_(self.fc1.bias)

    def forward(self, x):
        h = torch.tanh(self.fc1(x.flatten(1)))
        return self.fc2(h + 0.5 * self.fc1.bias)


class InsideAndOutside(nn.Module):
    """A module called once, and its weight also read by a functional call beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(12, 6), nn.Linear(6, 1)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(torch.tanh(self.fc(x) + 0.3 * F.linear(x.flip(1), self.fc.weight)))


class HookReadsWeight(nn.Module):
    """A forward hook of the user's that reads the layer's weight (it runs after the capture's own hook)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(12, 6), nn.Linear(6, 1)
        self.fc.register_forward_hook(lambda module, args, out: out * module.weight.norm())

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x.flatten(1))))


class ListTied(nn.Module):
    """A weight reached through a plain list, so no module registers it twice (the tie is invisible to
    ``named_parameters``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(12, 12), nn.Linear(12, 1)
        self._tied = [self.a]

    def forward(self, x):
        h = torch.tanh(self.a(x.flatten(1)))
        return self.head(torch.tanh(h @ self._tied[0].weight))


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).mT


def _parametrised() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 1))
    parametrize.register_parametrization(model[1], "weight", Symmetric())
    return model


def _weight_norm() -> nn.Module:
    return nn.Sequential(nn.Flatten(), parametrizations.weight_norm(nn.Linear(12, 6)), nn.Tanh(), nn.Linear(6, 1))


def _spectral_norm() -> nn.Module:
    return nn.Sequential(nn.Flatten(), parametrizations.spectral_norm(nn.Linear(12, 6)), nn.Tanh(), nn.Linear(6, 1))


def _old_weight_norm() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (torch.nn.utils.weight_norm is deprecated, still used)
        layer = torch.nn.utils.weight_norm(nn.Linear(12, 6))
    return nn.Sequential(nn.Flatten(), layer, nn.Tanh(), nn.Linear(6, 1))


class SharedModules(nn.Module):
    """One Linear registered in two places and called from both (a shared submodule, called twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 12)
        self.b = self.a
        self.head = nn.Linear(12, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x.flatten(1))))))


class TiedEmbedding(nn.Module):
    """A token model whose output reuses its input embedding (tied embeddings of language models)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mix = nn.Embedding(10, 6), nn.Linear(6, 6)

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.emb(tokens).mean(1)))
        return h @ self.emb.weight[3]


# (factory, the parameter the warning must name, input shape); every one of these was silently wrong before.
REUSE = {
    "cosine head": (CosineHead, "fc.weight", (1, 3, 4)),
    "tied transposed weight": (TiedTransposed, "enc.weight", (1, 3, 4)),
    "standardised conv weight": (StandardisedConv, "conv.weight", (1, 3, 4)),
    "reused bias": (ReusedBias, "fc1.bias", (1, 3, 4)),
    "used inside and outside its module": (InsideAndOutside, "fc.weight", (1, 3, 4)),
    "forward hook reads the weight": (HookReadsWeight, "fc.weight", (1, 3, 4)),
    "weight tied through a plain list": (ListTied, "a.weight", (1, 3, 4)),
}
# Forms refused before any capture (a parameter owned by an unsupported module, or registered twice).
REFUSED = {
    "parametrize": (_parametrised, "parametrizations.weight.original", (1, 3, 4)),
    "weight_norm": (_weight_norm, "parametrizations.weight.original", (1, 3, 4)),
    "spectral_norm": (_spectral_norm, "parametrizations.weight.original", (1, 3, 4)),
    "old-style weight_norm": (_old_weight_norm, r"\(Linear\) has trainable parameters \(1.bias, 1.weight_g", (1, 3, 4)),
    "submodule registered twice": (SharedModules, "shared between|called more than once", (1, 3, 4)),
}


def _inputs(shape: tuple[int, ...], n1: int = 7, n2: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n1, *shape, generator=generator), torch.randn(n2, *shape, generator=generator)


@pytest.mark.parametrize("case", list(REUSE) + list(REFUSED))
def test_parameter_reuse_falls_back_with_a_warning_naming_the_parameter(case):
    make, names, shape = {**REUSE, **REFUSED}[case]
    torch.manual_seed(0)
    model = make().eval()
    own = {name: id(t) for name, t in model.named_parameters(remove_duplicate=False)}
    x1, x2 = _inputs(shape)
    expected = reference_ntk(model, x1, x2)
    for implementation in ("auto", "materialised"):
        if implementation == "auto":
            with pytest.warns(UserWarning, match=FALLBACK) as record:
                kernel = empirical_ntk(model, x1, x2, dtype=torch.float64)
            message = " ".join(str(w.message) for w in record)
            assert re.search(names, message), message
            assert relative_error(kernel, expected) < 1e-9
        else:
            with pytest.raises(ModelError, match="cannot compute this model's NTK exactly"):
                empirical_ntk(model, x1, x2, dtype=torch.float64, implementation=implementation)
    with pytest.raises(ModelError, match="cannot compute this model's NTK exactly"):
        empirical_ntk(model, x1, x2, dtype=torch.float64, implementation="structured")
    # the model still holds its own parameters (functional_call leaves a module reached under two names holding
    # the tensors it swapped in; the kernel functions put them back)
    assert {name: id(t) for name, t in model.named_parameters(remove_duplicate=False)} == own


@pytest.mark.parametrize("case", list(REUSE))
def test_the_audit_names_why_and_how_much_is_missed(case):
    make, name, shape = REUSE[case]
    torch.manual_seed(0)
    model = make().eval()
    with pytest.warns(UserWarning, match=rf"parameter {name} is not seen whole by the layer hooks \(\d+\.\d% of"):
        empirical_ntk(model, _inputs(shape)[0], dtype=torch.float64)


@pytest.mark.parametrize("case", ["cosine head", "tied transposed weight", "reused bias"])
def test_every_entry_point_and_float32_fall_back_too(case):
    make, _, shape = REUSE[case]
    torch.manual_seed(0)
    model = make().eval()
    x1, x2 = _inputs(shape)
    expected_train, expected_test = reference_ntk(model, x1), reference_ntk(model, x2, x1)
    with pytest.warns(UserWarning, match=FALLBACK):
        k_train, k_test = empirical_ntk_train_test(model, x1, x2)
    assert k_train.dtype == torch.float32
    assert relative_error(k_train, expected_train) < 1e-5 and relative_error(k_test, expected_test) < 1e-5
    views = [x1, x1.flip(-1)]
    with pytest.warns(UserWarning, match=FALLBACK):
        gram = empirical_ntk_views(model, views, dtype=torch.float64)
    assert torch.allclose(gram[:, 0, 1], torch.diagonal(reference_ntk(model, x1, x1.flip(-1))), rtol=1e-9)


class Interacts(nn.Module):
    """Examples interact within a batch (a batch-dependent scale): the sum trick mixes their gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(12, 6), nn.Linear(6, 1)

    def forward(self, x):
        z = self.fc(x.flatten(1))
        return self.head(torch.tanh(z)) * (1 + 0.1 * z.mean())


def test_examples_that_interact_within_a_batch_are_caught():
    torch.manual_seed(0)
    model = Interacts().eval()
    x = _inputs((1, 3, 4))[0]
    with pytest.warns(UserWarning, match="examples interact"):
        empirical_ntk(model, x, dtype=torch.float64)


def test_the_audit_passes_every_supported_form_and_leaves_the_global_random_state_alone():
    from lightning_afterkernel.kernels import _structured as st

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 4), nn.Linear(4, 1)
    ).eval()
    model[1].running_mean.normal_()
    x = _inputs((1, 3, 4))[0]
    trainable = {k: v.detach() for k, v in model.named_parameters()}
    fixed = {k: v for k, v in model.named_buffers()}
    for structured in (False, True):
        layers = st.plan(model, set(trainable))
        for layer in layers:
            layer.structured = structured and layer.kind != "batchnorm"
        state = torch.get_rng_state()
        audit_capture(model, probe_capture(model, trainable, fixed, layers, x), layers)
        assert torch.equal(torch.get_rng_state(), state)
    assert AUDIT_EXAMPLES <= len(x)


def test_a_missed_use_smaller_than_float32_rounding_is_still_caught():
    """The audit runs in float64: a reuse contributing 1e-7 of the gradient is found."""

    class Tiny(ReusedBias):
        def forward(self, x):
            h = torch.tanh(self.fc1(x.flatten(1)))
            return self.fc2(h + 1e-7 * self.fc1.bias)

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="fc1.bias"):
        empirical_ntk(Tiny().eval(), _inputs((1, 3, 4))[0], dtype=torch.float64)


# ------------------------------------------------------------------ networks this project did not write
def _calibrated(model: nn.Module, shape: tuple[int, ...], seed: int) -> nn.Module:
    """BatchNorm running statistics from a few batches in train mode (as after training), then eval mode."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *shape, generator=generator))
    return model.eval()


class PatchTransformer(nn.Module):
    """A small vision transformer: patch embedding, learned positional embedding, one encoder layer
    (multi-head attention, LayerNorm, GELU), mean pooling, a linear head."""

    def __init__(self, patch: int = 4, width: int = 16, tokens: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, width, patch, stride=patch)
        self.position = nn.Parameter(0.1 * torch.randn(1, tokens, width))
        self.encoder = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.1, activation="gelu", batch_first=True)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 1)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).mT + self.position
        return self.head(self.norm(self.encoder(tokens)).mean(1))


class LinearAttention(nn.Module):
    """Self-attention built from Linear modules only (each called once, on (n, T, d) tokens): the structured
    engine's Linear-on-sequences form, exactly."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        tokens = self.embed(x.reshape(len(x), 3, 4))
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)
        attention = torch.softmax(q @ k.mT / k.shape[-1] ** 0.5, dim=-1)
        return self.head(F.gelu(self.o(attention @ v)).mean(1))


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return _calibrated(resnet18(num_classes=1), (3, 32, 32), 0)


def _mobilenet() -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    return _calibrated(mobilenet_v3_small(num_classes=1), (3, 32, 32), 1)


ZOO = {
    "linear attention": (lambda: LinearAttention(), (1, 3, 4), 7, 5),
    "transformer encoder": (lambda: PatchTransformer(), (1, 8, 8), 5, 3),
    "mobilenet_v3_small": (_mobilenet, (3, 32, 32), 3, 2),
    "resnet18": (_resnet18, (3, 32, 32), 3, 2),
}


def _zoo_kernel_matches(make, shape, n1, n2) -> list[str]:
    torch.manual_seed(0)
    model = make().eval()
    x1, x2 = _inputs(shape, n1, n2)
    expected = reference_ntk(model, x1, x2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kernel = empirical_ntk(model, x1, x2, dtype=torch.float64)
    messages = [str(w.message) for w in record if FALLBACK in str(w.message)]
    assert relative_error(kernel, expected) < 1e-9
    return messages


@pytest.mark.parametrize(
    "name, fast",
    [("linear attention", True), ("transformer encoder", False), ("mobilenet_v3_small", True), ("resnet18", True)],
)
def test_user_networks_match_the_reference_fast_or_by_the_announced_fallback(name, fast):
    make, shape, n1, n2 = ZOO[name]
    messages = _zoo_kernel_matches(make, shape, n1, n2)
    assert (not messages) if fast else messages, messages
