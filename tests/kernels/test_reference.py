"""reference_ntk against closed forms and per-example autograd loops, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_afterkernel.errors import ConfigurationError, ModelError
from lightning_afterkernel.kernels import reference_ntk


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def loop_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """J1 J2^T with each Jacobian row from its own torch.autograd.grad call."""
    params = [p for p in model.parameters() if p.requires_grad]

    def jacobian(x: torch.Tensor) -> torch.Tensor:
        rows = []
        for xi in x:
            grads = torch.autograd.grad(model(xi.unsqueeze(0)).sum(), params)
            rows.append(torch.cat([g.flatten() for g in grads]))
        return torch.stack(rows)

    return jacobian(x1) @ jacobian(x2).T


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 1),
    )


def test_linear_model_is_gram_plus_one():
    torch.manual_seed(0)
    model = nn.Linear(6, 1).double()
    x1, x2 = torch.randn(5, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    assert relative_error(reference_ntk(model, x1, x2), x1 @ x2.T + 1) < 1e-12
    assert relative_error(reference_ntk(model, x1), x1 @ x1.T + 1) < 1e-12


def test_one_hidden_layer_relu_matches_autograd_loop():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)).double()
    x1, x2 = torch.randn(8, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    assert relative_error(reference_ntk(model, x1, x2), loop_ntk(model, x1, x2)) < 1e-10
    assert relative_error(reference_ntk(model, x1), loop_ntk(model, x1, x1)) < 1e-10


def test_conv_net_matches_autograd_loop():
    torch.manual_seed(2)
    model = conv_net().double()
    x1, x2 = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randn(4, 2, 8, 8, dtype=torch.float64)
    assert relative_error(reference_ntk(model, x1, x2), loop_ntk(model, x1, x2)) < 1e-10


def test_float32_model_is_computed_in_float64_on_a_copy():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(7, 4)
    kernel = reference_ntk(model, x)
    assert kernel.dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32
    x64 = x.double()
    assert relative_error(kernel, loop_ntk(model.double(), x64, x64)) < 1e-10


def test_symmetric_exactly_with_non_negative_diagonal_and_chunking():
    torch.manual_seed(4)
    model = conv_net()
    x = torch.randn(9, 2, 8, 8)
    kernel = reference_ntk(model, x)
    assert torch.equal(kernel, kernel.T)
    assert (kernel.diagonal() >= 0).all()
    assert relative_error(reference_ntk(model, x, chunk_size=2), kernel) < 1e-12


def test_frozen_parameters_are_excluded():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    model[0].requires_grad_(False)
    x = torch.randn(6, 3, dtype=torch.float64)
    hidden = model[1](model[0](x))
    assert relative_error(reference_ntk(model, x), hidden @ hidden.T + 1) < 1e-12


def test_an_output_that_is_not_logits_per_example_is_refused_with_its_shape():
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)))
    with pytest.raises(ModelError, match=r"\(n, k\).*returned shape \(2, 2, 3\)"):
        reference_ntk(model, torch.randn(5, 4))


@pytest.mark.parametrize(
    ("x1", "x2"),
    [
        (torch.randn(3, 4), torch.randn(3, 5)),
        (torch.randn(0, 4), None),
        (torch.randn(3, 4), torch.randn(0, 4)),
        (torch.tensor(1.0), None),
        ([[1.0, 2.0, 3.0, 4.0]], None),
    ],
)
def test_bad_inputs_are_refused(x1, x2):
    with pytest.raises(ConfigurationError, match="x1|x2"):
        reference_ntk(nn.Linear(4, 1), x1, x2)


def test_bad_options_and_models_are_refused():
    x = torch.randn(3, 4)
    with pytest.raises(ConfigurationError, match="dtype"):
        reference_ntk(nn.Linear(4, 1), x, dtype=torch.int64)
    with pytest.raises(ConfigurationError, match="chunk_size"):
        reference_ntk(nn.Linear(4, 1), x, chunk_size=0)
    with pytest.raises(ModelError, match="requires_grad"):
        reference_ntk(nn.Linear(4, 1).requires_grad_(False), x)
    with pytest.raises(ModelError, match="nn.Module"):
        reference_ntk(lambda t: t.sum(1), x)
