"""conjugate_kernel: Phi Phi^T from model.features, and the state it leaves the model in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_afterkernel.errors import ConfigurationError, ModelError
from lightning_afterkernel.kernels import conjugate_kernel


class FeatureNet(nn.Module):
    """body -> features, head -> logit; dropout makes train mode visible."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(0.5), nn.Linear(10, 8), nn.ReLU())
        self.head = nn.Linear(8, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ConvFeatureNet(nn.Module):
    """Features are a feature map (n, C, H, W), flattened by the kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_equals_features_gram():
    model = FeatureNet().double().eval()
    x1, x2 = torch.randn(9, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    phi1, phi2 = model.features(x1), model.features(x2)
    assert torch.allclose(conjugate_kernel(model, x1, x2, dtype=torch.float64), phi1 @ phi2.T, rtol=1e-12)
    kernel = conjugate_kernel(model, x1, dtype=torch.float64, batch_size=2)
    assert torch.allclose(kernel, phi1 @ phi1.T, rtol=1e-12)
    assert torch.equal(kernel, kernel.T)


def test_paired_mode_is_the_diagonal_of_the_cross_kernel():
    model = FeatureNet().double().eval()
    x1, x2 = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    cross = conjugate_kernel(model, x1, x2, dtype=torch.float64)
    pairs = conjugate_kernel(model, x1, x2, dtype=torch.float64, paired=True)
    assert pairs.shape == (5,) and torch.allclose(pairs, cross.diagonal(), rtol=1e-12)
    diagonal = conjugate_kernel(model, x1, dtype=torch.float64, paired=True)
    assert torch.allclose(diagonal, conjugate_kernel(model, x1, dtype=torch.float64).diagonal(), rtol=1e-12)
    with pytest.raises(ConfigurationError, match="same number of examples; got 5 and 4"):
        conjugate_kernel(model, x1, x2[:4], paired=True)


def test_feature_maps_are_flattened_and_computed_in_the_requested_dtype():
    model = ConvFeatureNet()
    x = torch.randn(5, 1, 6, 6)
    kernel = conjugate_kernel(model, x, dtype=torch.float64)
    phi = model.double().features(x.double()).flatten(1)
    assert kernel.dtype == torch.float64 and kernel.shape == (5, 5)
    assert torch.allclose(kernel, phi @ phi.T, rtol=1e-12)
    model.features = lambda x: model.body(x).float()  # a model that fixes its features' dtype
    assert conjugate_kernel(model, x, dtype=torch.float64).dtype == torch.float64


def test_model_state_is_left_untouched_and_dropout_is_off():
    model = FeatureNet().train()
    model.body[1].eval()
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(7, 6)
    kernel = conjugate_kernel(model, x)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    phi = model.eval().features(x)
    assert torch.allclose(kernel, phi @ phi.T, rtol=1e-6)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(context):
    model = FeatureNet()
    expected = conjugate_kernel(model, torch.ones(3, 6))
    with context():
        kernel = conjugate_kernel(model, torch.ones(3, 6))
    assert torch.equal(kernel, expected)
    assert not kernel.is_inference()


def test_missing_features_is_a_model_error():
    with pytest.raises(ModelError, match=r"features\(x\).*penultimate"):
        conjugate_kernel(nn.Linear(6, 1), torch.randn(3, 6))
    model = nn.Linear(6, 1)
    model.features = 3
    with pytest.raises(ModelError, match="features"):
        conjugate_kernel(model, torch.randn(3, 6))
    model.features = nn.Identity()  # a layer stack named `features` (torchvision's VGG) is not the CK's
    with pytest.raises(ModelError, match="submodule named `features` does not count"):
        conjugate_kernel(model, torch.randn(3, 6))


def test_bad_features_and_inputs_are_refused():
    model = FeatureNet()
    model.features = lambda x: model.body(x).sum(0)  # one vector for the whole batch
    with pytest.raises(ModelError, match="one feature vector per example"):
        conjugate_kernel(model, torch.randn(3, 6))
    with pytest.raises(ConfigurationError, match="same per-example shape"):
        conjugate_kernel(FeatureNet(), torch.randn(3, 6), torch.randn(3, 5))
    with pytest.raises(ConfigurationError, match="at least one example"):
        conjugate_kernel(FeatureNet(), torch.randn(0, 6))
