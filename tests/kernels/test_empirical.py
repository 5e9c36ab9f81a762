"""empirical_ntk against reference_ntk, its chunking, and the state it leaves the model in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_afterkernel.errors import ConfigurationError, ModelError
from lightning_afterkernel.kernels import empirical, empirical_ntk, reference_ntk


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


def conv_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 1),
    )


def stateful_net() -> nn.Module:
    """BatchNorm with non-trivial running statistics and dropout, left in train mode."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))
    model(torch.randn(32, 5))  # updates the running statistics
    return model.train()


class TiedNet(nn.Module):
    """One Linear layer applied twice: its gradient sums both uses."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


@pytest.mark.parametrize(
    ("make", "shape"), [(mlp, (12,)), (conv_net, (1, 6, 6)), (stateful_net, (5,)), (TiedNet, (4,))]
)
def test_float64_matches_reference(make, shape):
    model = make()
    torch.manual_seed(3)
    x1, x2 = torch.randn(10, *shape), torch.randn(6, *shape)
    for a, b in [(x1, None), (x1, x2)]:
        expected = reference_ntk(model, a, b)
        assert relative_error(empirical_ntk(model, a, b, dtype=torch.float64), expected) < 1e-10
        assert relative_error(empirical_ntk(model, a, b, dtype=torch.float64, batch_size=3), expected) < 1e-10


def test_tied_weights_count_both_uses():
    model = TiedNet().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    rows = []
    for xi in x:
        grads = torch.autograd.grad(model(xi.unsqueeze(0)).sum(), list(model.parameters()))
        rows.append(torch.cat([g.flatten() for g in grads]))
    jacobian = torch.stack(rows)
    assert relative_error(empirical_ntk(model, x, dtype=torch.float64), jacobian @ jacobian.T) < 1e-10


def test_float32_close_to_float64_reference():
    model = mlp()
    x1, x2 = torch.randn(20, 12), torch.randn(7, 12)
    kernel = empirical_ntk(model, x1, x2)
    assert kernel.dtype == torch.float32
    assert relative_error(kernel, reference_ntk(model, x1, x2)) < 1e-5


def test_chunked_symmetric_gram_is_exact_symmetric_psd_and_matches_unchunked():
    model = conv_net()
    x = torch.randn(20, 1, 6, 6, dtype=torch.float64)
    whole = empirical_ntk(model, x, dtype=torch.float64)
    chunked = empirical_ntk(model, x, dtype=torch.float64, batch_size=7)
    assert relative_error(chunked, whole) < 1e-12
    assert torch.equal(chunked, chunked.T) and torch.equal(whole, whole.T)
    assert torch.equal(empirical_ntk(model, x, x, dtype=torch.float64, batch_size=7), chunked)
    eigenvalues = torch.linalg.eigvalsh(chunked)
    assert eigenvalues.min() >= -1e-8 * eigenvalues.max()
    assert (chunked.diagonal() >= 0).all()


def test_default_chunk_size_follows_the_memory_budget(monkeypatch):
    model = mlp()
    monkeypatch.setattr(empirical, "CAPTURE_SHARE", 1.0)
    batches = []
    model.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    x = torch.randn(40, 12)
    kernel = empirical_ntk(model, x, memory_budget=20_000)
    assert len(batches) > 3 and max(batches[1:]) < 40  # after the 2-example probe, several small chunks
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-5


def test_model_state_is_left_untouched():
    model = stateful_net()
    model[1].eval()  # mixed flags must come back as they were
    flags = [m.training for m in model.modules()]
    model[0].weight.grad = torch.ones_like(model[0].weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(9, 5)
    kernel = empirical_ntk(model, x)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(empirical_ntk(model, x), kernel)  # dropout off: deterministic
    assert relative_error(kernel, empirical_ntk(model.eval(), x)) < 1e-6


def test_flags_restored_after_an_error():
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.Dropout(0.1)).train()
    with pytest.raises(ModelError, match=r"logits per example.*returned shape \(2, 2, 3\)"):
        empirical_ntk(model, torch.randn(5, 4))
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(context):
    model = mlp()
    expected = empirical_ntk(model, torch.ones(4, 12))
    with context():
        x = torch.ones(4, 12)
        kernel = empirical_ntk(model, x)
        cross = empirical_ntk(model, x, torch.ones(2, 12))
    assert torch.equal(kernel, expected)
    assert torch.allclose(cross, expected[:, :2], rtol=1e-6, atol=0)
    assert not kernel.is_inference() and not cross.is_inference()  # usable by autograd and in-place ops


def test_inputs_and_model_are_cast_to_the_requested_dtype_and_device():
    model = mlp().double()
    x = torch.randn(6, 12)  # float32 input, float64 model
    kernel = empirical_ntk(model, x, dtype=torch.float32, device="cpu")
    assert kernel.dtype == torch.float32 and kernel.device.type == "cpu"
    assert next(model.parameters()).dtype == torch.float64
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-5


@pytest.mark.gpu
def test_cuda_matches_cpu():
    model = conv_net()
    x = torch.randn(8, 1, 6, 6)
    kernel = empirical_ntk(model, x, dtype=torch.float64, device="cuda")
    assert kernel.device.type == "cuda"
    assert relative_error(kernel.cpu(), reference_ntk(model, x)) < 1e-10


def test_bad_arguments_are_refused():
    model = mlp()
    with pytest.raises(ConfigurationError, match="same per-example shape"):
        empirical_ntk(model, torch.randn(3, 12), torch.randn(3, 13))
    with pytest.raises(ConfigurationError, match="at least one example"):
        empirical_ntk(model, torch.randn(0, 12))
    with pytest.raises(ConfigurationError, match="batch_size"):
        empirical_ntk(model, torch.randn(3, 12), batch_size=0)
    with pytest.raises(ConfigurationError, match="dtype"):
        empirical_ntk(model, torch.randn(3, 12), dtype=torch.int32)
    with pytest.raises(ConfigurationError, match="implementation='fast' must be one of"):
        empirical_ntk(model, torch.randn(3, 12), implementation="fast")
    with pytest.raises(ConfigurationError, match="memory_budget='lots'.*'1GiB'"):
        empirical_ntk(model, torch.randn(3, 12), memory_budget="lots")
    with pytest.raises(ConfigurationError, match="memory_budget=-5"):
        empirical_ntk(model, torch.randn(3, 12), memory_budget=-5)
    with pytest.raises(ConfigurationError, match="paired=True.*same number of examples; got 3 and 2"):
        empirical_ntk(model, torch.randn(3, 12), torch.randn(2, 12), paired=True)
