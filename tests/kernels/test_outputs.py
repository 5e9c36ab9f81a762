"""Multi-output networks: the trace, per-logit and full eNTK of every implementation and entry point against the
float64 reference, and the reference's own multi-logit path against its one-logit path (a wrapper that selects a
logit, or sums two)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.kernels import (
    empirical,
    empirical_ntk,
    empirical_ntk_train_test,
    empirical_ntk_views,
    reference_ntk,
)

IMPLEMENTATIONS = ["structured", "materialised", "vmap"]
K = 3


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _seeded(seed: int, *layers: nn.Module) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            nn.init.normal_(module.bias)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


MODELS = {
    "linear": (lambda: _seeded(0, nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, K)), (3, 4)),
    "conv_pool_batchnorm": (
        lambda: _seeded(
            1,
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, K),
        ),
        (2, 6, 6),
    ),
    "linear_on_sequences": (
        lambda: _seeded(2, nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Flatten(), nn.Linear(9, K)),
        (3, 4),
    ),
}


class Logit(nn.Module):
    """One logit, or the sum of two, of a multi-output model: a one-logit model for the trusted reference path."""

    def __init__(self, model: nn.Module, *logits: int) -> None:
        super().__init__()
        self.model, self.logits = model, list(logits)

    def forward(self, x):
        return self.model(x)[:, self.logits].sum(1)


def _inputs(shape, n1=7, n2=5, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n1, *shape, generator=generator), torch.randn(n2, *shape, generator=generator)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_references_multi_logit_path_agrees_with_its_one_logit_path(name):
    make, shape = MODELS[name]
    model = make()
    x1, x2 = _inputs(shape)
    per_logit = [reference_ntk(Logit(model, c), x1, x2) for c in range(K)]
    assert relative_error(reference_ntk(model, x1, x2), sum(per_logit)) < 1e-12
    for c in range(K):
        assert torch.equal(reference_ntk(model, x1, x2, outputs=c), reference_ntk(model, x1, x2, outputs=c))
        assert relative_error(reference_ntk(model, x1, x2, outputs=c), per_logit[c]) < 1e-12
    full = reference_ntk(model, x1, x2, outputs="full")
    assert full.shape == (len(x1), len(x2), K, K)
    for a in range(K):
        assert relative_error(full[:, :, a, a], per_logit[a]) < 1e-12
        for b in range(a + 1, K):  # polarisation: K_(a+b) = K_aa + K_bb + K_ab + K_ba
            mixed = reference_ntk(Logit(model, a, b), x1, x2) - per_logit[a] - per_logit[b]
            assert relative_error(full[:, :, a, b] + full[:, :, b, a], mixed) < 1e-10
    symmetric = reference_ntk(model, x1, outputs="full")
    assert torch.equal(symmetric, symmetric.permute(1, 0, 3, 2))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_every_mode_matches_the_reference_in_float64(name, implementation):
    make, shape = MODELS[name]
    model = make()
    x1, x2 = _inputs(shape)
    options = dict(implementation=implementation, dtype=torch.float64)
    for outputs in ("trace", "full", *range(K)):
        for second in (None, x2):
            expected = reference_ntk(model, x1, second, outputs=outputs)
            kernel = empirical_ntk(model, x1, second, outputs=outputs, **options)
            assert kernel.shape == expected.shape
            assert relative_error(kernel, expected) < 1e-9, (outputs, second is None)
            if second is None:
                assert torch.equal(kernel, kernel.mT if kernel.ndim == 2 else kernel.permute(1, 0, 3, 2))


@pytest.mark.parametrize("implementation", ["structured", "vmap"])
@pytest.mark.parametrize("outputs", ["trace", "full", 1])
def test_paired_train_test_and_views_in_every_mode(implementation, outputs):
    make, shape = MODELS["conv_pool_batchnorm"]
    model = make()
    x1, x2 = _inputs(shape, 6, 6)
    options = dict(outputs=outputs, implementation=implementation, dtype=torch.float64)
    cross = reference_ntk(model, x1, x2, outputs=outputs)
    diagonal = torch.diagonal(cross, dim1=0, dim2=1)  # (n,) or (k, k, n)
    paired = empirical_ntk(model, x1, x2, paired=True, **options)
    assert relative_error(paired, diagonal if diagonal.ndim == 1 else diagonal.permute(2, 0, 1)) < 1e-9
    k_train, k_test = empirical_ntk_train_test(model, x1, x2, **options)
    assert relative_error(k_train, reference_ntk(model, x1, outputs=outputs)) < 1e-9
    assert relative_error(k_test, reference_ntk(model, x2, x1, outputs=outputs)) < 1e-9
    views = [x1, x2, x1.flip(-1)]
    gram = empirical_ntk_views(model, views, **options)
    for a in range(3):
        for b in range(3):
            expected = torch.diagonal(reference_ntk(model, views[a], views[b], outputs=outputs), dim1=0, dim2=1)
            expected = expected if expected.ndim == 1 else expected.permute(2, 0, 1)
            assert relative_error(gram[:, a, b], expected) < 1e-9


@pytest.mark.parametrize("outputs", ["trace", "full"])
def test_tiles_panels_and_shards_in_every_mode(monkeypatch, outputs):
    monkeypatch.setattr(empirical, "TILE", 3)
    make, shape = MODELS["conv_pool_batchnorm"]
    model = make()
    x1, x2 = _inputs(shape, 11, 7)
    options = dict(outputs=outputs, dtype=torch.float64, batch_size=4, memory_budget=60_000)
    expected = reference_ntk(model, x1, outputs=outputs)
    assert relative_error(empirical_ntk(model, x1, **options), expected) < 1e-9
    assert relative_error(empirical_ntk(model, x2, x1, **options), reference_ntk(model, x2, x1, outputs=outputs)) < 1e-9
    shards = [empirical_ntk(model, x1, shard=(rank, 3), **options) for rank in range(3)]
    assert relative_error(sum(shards), expected) < 1e-9
    assert all(torch.count_nonzero(part) < expected.numel() for part in shards)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_one_logit_models_give_todays_kernel_in_every_mode_bit_for_bit(implementation):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 1))
    x1, x2 = _inputs((1, 4, 6), 6, 4)
    today = empirical_ntk(model, x1, x2, implementation=implementation)
    assert torch.equal(empirical_ntk(model, x1, x2, outputs="trace", implementation=implementation), today)
    assert torch.equal(empirical_ntk(model, x1, x2, outputs=0, implementation=implementation), today)
    full = empirical_ntk(model, x1, x2, outputs="full", implementation=implementation)
    assert full.shape == (6, 4, 1, 1) and torch.equal(full[..., 0, 0], today)
    assert reference_ntk(model, x1, outputs="full").shape == (6, 6, 1, 1)


@pytest.mark.parametrize("outputs", ["sum", K, -1, True, 1.0])
def test_bad_outputs_are_refused(outputs):
    make, shape = MODELS["linear"]
    with pytest.raises(ConfigurationError, match="outputs="):
        empirical_ntk(make(), torch.randn(4, *shape), outputs=outputs)
    with pytest.raises(ConfigurationError, match="outputs="):
        reference_ntk(make(), torch.randn(4, *shape), outputs=outputs)


class TiedHead(nn.Module):
    """A 2-logit head that reuses its body's weight for its second logit: the audit must see it per logit."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 6), nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return torch.cat([self.head(h), (h @ self.body.weight[:, :1])], dim=1)


@pytest.mark.parametrize("outputs", ["trace", "full", 1])
def test_the_audit_covers_every_selected_logit(outputs):
    torch.manual_seed(5)
    model = TiedHead()
    x = torch.randn(6, 6)
    with pytest.warns(UserWarning, match="body.weight is not seen whole"):
        kernel = empirical_ntk(model, x, outputs=outputs, dtype=torch.float64)
    assert relative_error(kernel, reference_ntk(model, x, outputs=outputs)) < 1e-9
    with pytest.raises(Exception, match="cannot compute this model's NTK exactly"):
        empirical_ntk(model, x, outputs=outputs, implementation="structured")


def test_logit_zero_of_the_tied_head_is_seen_whole():
    """Logit 0 does not touch the reused weight: its kernel takes the fast engine, exactly."""
    torch.manual_seed(5)
    model = TiedHead()
    x = torch.randn(6, 6)
    kernel = empirical_ntk(model, x, outputs=0, implementation="structured", dtype=torch.float64)
    assert relative_error(kernel, reference_ntk(model, x, outputs=0)) < 1e-9


@pytest.mark.parametrize("outputs", ["trace", "full", 2])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_layer_in_the_structured_form_in_every_mode(monkeypatch, name, outputs):
    from lightning_afterkernel.kernels import _structured

    original = _structured.choose_forms
    forms = []

    def structured(layers, probe, pairs, examples, force, widen=1):
        original(layers, probe, pairs, examples, "structured", widen)
        forms.extend(layer.structured for layer in layers)

    monkeypatch.setattr(_structured, "choose_forms", structured)
    make, shape = MODELS[name]
    model = make()
    x1, x2 = _inputs(shape)
    kernel = empirical_ntk(model, x1, x2, outputs=outputs, implementation="structured", dtype=torch.float64)
    assert any(forms)
    assert relative_error(kernel, reference_ntk(model, x1, x2, outputs=outputs)) < 1e-9
