"""The structured eNTK engine: every implementation and layer form against the float64 reference."""

from __future__ import annotations

import threading
import time
import warnings
import weakref

import pytest
import torch
from torch import nn

from lightning_afterkernel.errors import ConfigurationError, KernelError, ModelError
from lightning_afterkernel.kernels import (
    _audit,
    _cpu,
    _gram,
    _settings,
    _structured,
    empirical,
    empirical_ntk,
    empirical_ntk_train_test,
    empirical_ntk_views,
    reference_ntk,
)

IMPLEMENTATIONS = ["structured", "materialised", "vmap"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
"""Tests parametrised by DEVICES run their model and inputs on each device (the CUDA ones on a GPU only) and
compare with float64 references computed on the CPU."""


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def seeded(seed: int, *layers: nn.Module) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(*layers)
    for module in model.modules():  # non-zero biases and BN affine parameters and statistics
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            nn.init.normal_(module.bias)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model


MODELS = {
    "mlp": (
        lambda: seeded(0, nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 1)),
        (3, 4),
    ),
    "conv_strided_padded": (
        lambda: seeded(1, nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 1)),
        (2, 7, 8),
    ),
    "conv_grouped_dilated": (
        lambda: seeded(
            2,
            nn.Conv2d(4, 6, 3, dilation=2, padding=2, groups=2),
            nn.Tanh(),
            nn.Conv2d(6, 3, (2, 3), groups=3, bias=False),
            nn.Flatten(),
            nn.Linear(3 * 5 * 4, 1),
        ),
        (4, 6, 6),
    ),
    "conv_same_reflect_circular": (
        lambda: seeded(
            3,
            nn.Conv2d(1, 3, 3, padding="same", padding_mode="reflect"),
            nn.ReLU(inplace=True),
            nn.Conv2d(3, 2, 4, padding="same", padding_mode="circular"),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 1),
        ),
        (1, 6, 6),
    ),
    "batchnorm": (
        lambda: seeded(
            4,
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 6),
            nn.BatchNorm1d(6),
            nn.Tanh(),
            nn.Linear(6, 1),
        ),
        (2, 4, 4),
    ),
    "linear_on_sequences": (
        lambda: seeded(5, nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Flatten(), nn.Linear(10, 1)),
        (5, 3),
    ),
}


def force_forms(monkeypatch, form: str) -> None:
    """Make every eligible layer take ``form`` ("structured" or "materialised")."""
    original = _structured.choose_forms

    def forced(layers, probe, pairs, examples, force, widen=1):
        return original(layers, probe, pairs, examples, form, widen)

    monkeypatch.setattr(_structured, "choose_forms", forced)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_every_implementation_matches_the_reference_in_float64(name, implementation, device):
    make, shape = MODELS[name]
    model = make()
    torch.manual_seed(10)
    x1, x2 = torch.randn(9, *shape), torch.randn(5, *shape)
    expected, expected_cross = reference_ntk(model, x1), reference_ntk(model, x1, x2)
    model, x1, x2 = model.to(device), x1.to(device), x2.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these models may fall back
        gram = empirical_ntk(model, x1, implementation=implementation, dtype=torch.float64)
        cross = empirical_ntk(model, x1, x2, implementation=implementation, dtype=torch.float64)
        pairs = empirical_ntk(model, x1[:5], x2, implementation=implementation, dtype=torch.float64, paired=True)
        diagonal = empirical_ntk(model, x1, implementation=implementation, dtype=torch.float64, paired=True)
    assert {t.device.type for t in (gram, cross, pairs, diagonal)} == {device}
    assert relative_error(gram, expected) < 1e-9
    assert torch.equal(gram, gram.T)
    assert relative_error(cross, expected_cross) < 1e-9
    assert relative_error(pairs, expected_cross[:5].diagonal()) < 1e-9
    assert relative_error(diagonal, expected.diagonal()) < 1e-9


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("form", ["structured", "materialised"])
def test_each_layer_form_matches_the_reference(monkeypatch, name, form):
    force_forms(monkeypatch, form)
    make, shape = MODELS[name]
    model = make()
    x1, x2 = torch.randn(7, *shape), torch.randn(4, *shape)
    assert relative_error(empirical_ntk(model, x1, dtype=torch.float64), reference_ntk(model, x1)) < 1e-9
    cross = empirical_ntk(model, x1, x2, dtype=torch.float64)
    assert relative_error(cross, reference_ntk(model, x1, x2)) < 1e-9


@pytest.mark.parametrize("name", ["conv_strided_padded", "conv_grouped_dilated", "conv_same_reflect_circular"])
def test_conv_weight_gradients_by_im2col_equal_the_grouped_convolution(monkeypatch, name):
    make, shape = MODELS[name]
    model = make()
    x = torch.randn(6, *shape)
    grouped = empirical_ntk(model, x, implementation="materialised", dtype=torch.float64)
    monkeypatch.setattr(_structured, "GROUPED_CONV_DEVICES", ())  # the GPU route: patches and a batched matmul
    im2col = empirical_ntk(model, x, implementation="materialised", dtype=torch.float64)
    assert relative_error(im2col, grouped) < 1e-12
    assert relative_error(im2col, reference_ntk(model, x)) < 1e-10


@pytest.mark.parametrize("allow", [False, True])
def test_tf32_is_off_on_cuda_unless_asked_and_restored(allow):
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    with _settings.tf32(torch.device("cuda"), allow):
        assert matmul.fp32_precision == conv.fp32_precision == ("tf32" if allow else "ieee")
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    with _settings.tf32(torch.device("cpu"), allow):
        assert (matmul.fp32_precision, conv.fp32_precision) == before


def test_cost_model_picks_structured_linear_and_materialised_convs():
    model = seeded(
        0, nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 50), nn.ReLU(), nn.Linear(50, 1)
    )
    layers = _structured.plan(model, {n for n, _ in model.named_parameters()})
    probe = _structured.capture(model, dict(model.named_parameters()), layers, torch.randn(2, 1, 6, 6))
    _structured.choose_forms(layers, probe, pairs=1000**2 / 2, examples=1000, force=None)
    assert [layer.structured for layer in layers] == [False, True, False]  # conv: T = 36; head: p = 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_tiles_and_panels_smaller_than_the_data_give_the_same_kernel(monkeypatch, implementation, device):
    make, shape = MODELS["batchnorm"]
    model = make().to(device)
    x1, x2 = torch.randn(23, *shape, device=device), torch.randn(11, *shape, device=device)
    whole = empirical_ntk(model, x1, implementation=implementation, dtype=torch.float64)
    whole_cross = empirical_ntk(model, x1, x2, implementation=implementation, dtype=torch.float64)
    monkeypatch.setattr(empirical, "TILE", 4)
    monkeypatch.setattr(_gram, "TILE_TEMP_BYTES", 1)
    calls = []
    options = dict(implementation=implementation, dtype=torch.float64, batch_size=3, memory_budget=2_000)
    tiled = empirical_ntk(model, x1, progress=lambda done, total: calls.append((done, total)), **options)
    assert calls[-1] == (21, 21) and [d for d, _ in calls] == sorted(
        d for d, _ in calls
    )  # one tile per panel: 6 + 5 + ... + 1 strips
    assert relative_error(tiled, whole) < 1e-12 and torch.equal(tiled, tiled.T)
    assert relative_error(empirical_ntk(model, x1, x2, **options), whole_cross) < 1e-12


def test_panels_recompute_column_blocks_within_the_budget(monkeypatch):
    model, shape = MODELS["mlp"][0](), MODELS["mlp"][1]
    monkeypatch.setattr(empirical, "TILE", 5)
    seen = []
    model[1].register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    x = torch.randn(30, *shape)
    per_example = 8 * (12 + 1 + 7 + 7 + 1 + 5 + 6)  # float64 factors: two structured layers and the head
    kernel = empirical_ntk(model, x, dtype=torch.float64, memory_budget=10.5 * per_example / empirical.RESIDENT_SHARE)
    assert 30 < sum(seen) - 2 < 30 * 3  # panels of 10 rows: more than one pass, far fewer than one per tile
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_float32_is_as_accurate_as_the_tutorial_method(device):
    make, shape = MODELS["conv_strided_padded"]
    model = make()
    x = torch.randn(16, *shape)
    expected = reference_ntk(model, x)
    model, x = model.to(device), x.to(device)
    tutorial = relative_error(reference_ntk(model, x, dtype=torch.float32), expected)  # on the same device
    for implementation in IMPLEMENTATIONS:
        kernel = empirical_ntk(model, x, implementation=implementation)
        assert kernel.dtype == torch.float32
        assert relative_error(kernel, expected) < max(1e-5, 2 * tutorial)


class Shared(nn.Module):
    """Two Linear modules sharing one weight tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)
        self.c = nn.Linear(4, 4)
        self.c.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.c(torch.tanh(self.a(x)))))


class Scaled(nn.Module):
    """A trainable parameter outside any supported module."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.scale = nn.Linear(4, 1), nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.body(x)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


FALLBACKS = {
    "called twice": (Twice, "called more than once"),
    "shared parameter": (Shared, "shared between"),
    "parameter outside a supported module": (Scaled, r"Scaled\) has trainable parameters"),
    "unsupported module": (lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1)), "LayerNorm"),
    "batchnorm without statistics": (
        lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False), nn.Linear(3, 1)),
        "no running statistics",
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(FALLBACKS))
def test_unsupported_models_fall_back_with_a_warning_and_the_exact_kernel(case, device):
    make, reason = FALLBACKS[case]
    torch.manual_seed(0)
    model = make()
    x1, x2 = torch.randn(6, 4), torch.randn(3, 4)
    if case == "batchnorm without statistics":  # batch statistics: per-example (vmap) is the only meaning
        x1 = x2 = None
    if x1 is not None:
        expected = reference_ntk(model, x1, x2)
        with pytest.warns(UserWarning, match=f"general per-example-gradient path.*|{reason}"):
            kernel = empirical_ntk(model.to(device), x1.to(device), x2.to(device), dtype=torch.float64)
        assert kernel.device.type == device
        assert relative_error(kernel, expected) < 1e-10
    with pytest.raises(ModelError, match=f"implementation='structured' cannot compute.*{reason}.*'vmap'"):
        empirical_ntk(model.to(device), torch.randn(4, 4, device=device), implementation="structured")


class WithSpare(nn.Module):
    """A network with frozen tensors and a trainable layer that forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.net = seeded(6, nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
        self.net[0].bias.requires_grad_(False)
        self.net[2].weight.requires_grad_(False)
        self.spare = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_frozen_parameters_and_unused_layers_are_left_out(implementation):
    model = WithSpare()
    x = torch.randn(8, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel = empirical_ntk(model, x, implementation=implementation, dtype=torch.float64)
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-10


def test_progress_true_draws_a_tqdm_bar(capsys):
    make, shape = MODELS["mlp"]
    kernel = empirical_ntk(make(), torch.randn(6, *shape), progress=True)
    assert "empirical NTK" in capsys.readouterr().err
    assert kernel.shape == (6, 6)


def test_memory_budget_strings():
    assert _gram.parse_memory_budget("1GiB") == 2**30
    assert _gram.parse_memory_budget("512 MB") == 512 * 10**6
    assert _gram.parse_memory_budget(1e6) == 10**6
    assert _gram.parse_memory_budget(None) is None
    assert _gram.default_budget(torch.device("cpu")) > 2**20


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_train_test_in_one_pass_equals_two_calls(monkeypatch, implementation, device):
    monkeypatch.setattr(empirical, "TILE", 4)
    make, shape = MODELS["conv_strided_padded"]
    model = make()
    x_train, x_test = torch.randn(10, *shape), torch.randn(7, *shape)
    expected_train, expected_test = reference_ntk(model, x_train), reference_ntk(model, x_test, x_train)
    model, x_train, x_test = model.to(device), x_train.to(device), x_test.to(device)
    seen = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    options = dict(implementation=implementation, dtype=torch.float64)
    k_train, k_test = empirical_ntk_train_test(model, x_train, x_test, **options)
    if implementation != "vmap":
        # the outputs' check, the float64 probe and the audit's autograd pass, then every example once
        assert sum(seen) == 2 + 2 * _audit.AUDIT_EXAMPLES + 17
    assert torch.equal(k_train, k_train.T)
    assert relative_error(k_train, expected_train) < 1e-10
    assert relative_error(k_test, expected_test) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_views_give_each_examples_gram_matrix_across_views(implementation, device):
    make, shape = MODELS["conv_same_reflect_circular"]
    model = make()
    views = [torch.randn(6, *shape) for _ in range(3)]
    expected = [[reference_ntk(model, views[a], views[b]).diagonal() for b in range(3)] for a in range(3)]
    model, views = model.to(device), [v.to(device) for v in views]
    gram = empirical_ntk_views(model, views, implementation=implementation, dtype=torch.float64, batch_size=4)
    assert gram.shape == (6, 3, 3) and gram.device.type == device
    for a in range(3):
        for b in range(3):
            assert relative_error(gram[:, a, b], expected[a][b]) < 1e-10
    with pytest.raises(ConfigurationError, match="views must be a non-empty sequence of tensors of one shape"):
        empirical_ntk_views(model, [views[0], views[1][:3]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("implementation", ["structured", "vmap"])
def test_shards_sum_to_the_kernel_and_split_the_work(monkeypatch, world, implementation, device):
    monkeypatch.setattr(empirical, "TILE", 4)
    make, shape = MODELS["batchnorm"]
    model = make().to(device)
    x1, x2 = torch.randn(19, *shape, device=device), torch.randn(9, *shape, device=device)
    options = dict(implementation=implementation, dtype=torch.float64, memory_budget=4_000)
    calls = {
        "gram": lambda **kw: empirical_ntk(model, x1, **kw),
        "cross": lambda **kw: empirical_ntk(model, x1, x2, **kw),
        "paired": lambda **kw: empirical_ntk(model, x1[:9], x2, paired=True, batch_size=2, **kw),
        "train_test": lambda **kw: torch.cat(empirical_ntk_train_test(model, x1, x2, **kw)),
        "views": lambda **kw: empirical_ntk_views(model, [x1, x1.flip(0)], batch_size=3, **kw),
    }
    for name, call in calls.items():
        whole = call(**options)
        parts = [call(shard=(rank, world), **options) for rank in range(world)]
        assert relative_error(sum(parts), whole) < 1e-12, name  # (sharded runs use shorter strips)
        assert int(torch.stack([part != 0 for part in parts]).sum(0).max()) == 1, name  # one rank per entry
        nonzero = [int((part != 0).sum()) for part in parts]
        assert all(count > 0 for count in nonzero), (name, nonzero)  # each rank does a share


def test_bad_shard_is_refused():
    make, shape = MODELS["mlp"]
    with pytest.raises(ConfigurationError, match=r"shard=\(2, 2\) must be \(rank, world_size\)"):
        empirical_ntk(make(), torch.randn(3, *shape), shard=(2, 2))


def test_out_of_memory_halves_the_budget_and_retries(monkeypatch):
    make, shape = MODELS["mlp"]
    model = make()
    x = torch.randn(12, *shape)
    expected = empirical_ntk(model, x, dtype=torch.float64)
    failures = iter([True, True])
    original = empirical._Engine.factors

    def flaky(self, rows):
        if next(failures, False):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, rows)

    monkeypatch.setattr(empirical._Engine, "factors", flaky)
    with pytest.warns(UserWarning, match="ran out of memory.*retrying with half the memory budget") as caught:
        kernel = empirical_ntk(model, x, dtype=torch.float64, memory_budget="1MiB")
    assert len(caught) == 2
    assert torch.equal(kernel, expected)


def test_out_of_memory_every_time_is_a_clear_error(monkeypatch):
    make, shape = MODELS["mlp"]

    def broke(self, rows):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(empirical._Engine, "factors", broke)
    with pytest.warns(UserWarning), pytest.raises(KernelError, match="ran out of memory 5 times.*result alone needs"):
        empirical_ntk(make(), torch.randn(4, *shape))
    monkeypatch.setattr(empirical._Engine, "factors", lambda self, rows: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # other errors are not retried
        empirical_ntk(make(), torch.randn(4, *shape))


@pytest.mark.parametrize(("shape", "n"), [((3, 32, 32), 150), ((1, 28, 28), 12)])
def test_paper_vgg_float32_error_is_the_tutorials(shape, n):
    """n = 150 CIFAR images: where oneDNN's channels-last convolutions lost two digits (4.9e-6 vs 1.1e-7).

    On CPU only: here both forwards are oneDNN's direct convolutions, so the same ReLU gates and max-pool
    choices flip against float64. On a GPU the engine's convolutions are im2col matmuls and the tutorial's
    cuDNN's: other rounding, and on random images whether a near-tie flips is a coin toss for either method
    (with the im2col forward on CPU, 10 of 20 seeds of the CIFAR case flipped one, the oneDNN tutorial 7, with
    errors from 2e-6 to 3.5e-4 either way), so no fixed bound separates them. The GPU tests use real and flat
    images instead, where neither flips (``test_paper_vgg_float32_on_real_mnist_is_as_accurate_as_the_tutorial``
    and ``test_layouts.py``)."""
    from lightning_afterkernel.models import VGGClassifier

    torch.manual_seed(0)
    model = VGGClassifier(input_shape=shape)
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(1))
    expected = reference_ntk(model, x)
    tutorial = relative_error(reference_ntk(model, x, dtype=torch.float32), expected)
    assert relative_error(empirical_ntk(model, x), expected) < max(1e-6, 3 * tutorial)


def _channels_last_copy(x: torch.Tensor) -> torch.Tensor:
    """``x`` with channels-last strides; for one channel (784, 1, 28, 1), which PyTorch also calls contiguous
    (real MNIST tensors made from (N, H, W, 1) arrays come this way)."""
    return torch.empty(len(x), *x.shape[2:], x.shape[1]).permute(0, 3, 1, 2).copy_(x)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_inputs_in_any_memory_format_give_the_contiguous_inputs_kernel(monkeypatch, shape):
    """oneDNN picks its convolution by the input's strides, and its channels-last ones round differently
    (twice the activation error on real MNIST), so the capture copies every chunk to NCHW: bitwise the same
    kernel whatever the caller's strides."""
    from lightning_afterkernel.models import VGGClassifier

    torch.manual_seed(0)
    model = VGGClassifier(input_shape=shape)
    x = torch.rand(40, *shape, generator=torch.Generator().manual_seed(1))
    strided = _channels_last_copy(x)
    assert torch.equal(strided, x) and strided.stride() != x.stride()
    assert torch.equal(empirical_ntk(model, strided), empirical_ntk(model, x))
    assert torch.equal(empirical_ntk(model, x[:7], strided), empirical_ntk(model, x[:7], x))


@pytest.mark.parametrize("device", DEVICES)
def test_paper_vgg_float32_on_real_mnist_is_as_accurate_as_the_tutorial(real_mnist, device):
    """Real MNIST test images against 200 training images, in the data module's own tensors (strides of
    channels-last). Before the capture copied its chunks to NCHW this slice was 1.2e-4 from float64 (a max-pool
    near-tie flipped by the channels-last rounding), against the tutorial's 6e-8. On a GPU the tutorial is held
    to IEEE float32 (cuDNN's default TF32 put it 9.5e-4 away on an H200, where the engine was 2.2e-6; on the full
    split both were 3.0e-5 from float64, and before the capture's im2col convolutions the engine 2.9e-2)."""
    from lightning_afterkernel.models import VGGClassifier

    x_train, x_test = real_mnist[0][:200], real_mnist[1][:50]
    torch.manual_seed(0)
    model = VGGClassifier(input_shape=(1, 28, 28)).eval()
    expected = reference_ntk(model, x_test, x_train)
    model, x_train, x_test = model.to(device), x_train.to(device), x_test.to(device)
    with _settings.tf32(torch.device(device), allow=False):
        tutorial = relative_error(reference_ntk(model, x_test, x_train, dtype=torch.float32), expected)
    error = relative_error(empirical_ntk(model, x_test, x_train), expected)
    assert error < max(2e-7, 3 * tutorial)


class _ConstantBranch(nn.Module):
    """A parametrised layer applied to a constant: per example (``shared=False``) its output does not depend on
    the input; shared (one row for the whole batch) its gradient mixes the examples."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.shared = shared
        self.body, self.const, self.head = nn.Linear(6, 4), nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = x.new_ones(1 if self.shared else len(x), 3)
        return self.head(torch.tanh(self.body(x) * self.const(ones)))


def test_a_layer_without_per_example_rows_falls_back_to_vmap():
    model = _ConstantBranch(shared=True).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match="first dimension is not the batch"):
        kernel = empirical_ntk(model, x, dtype=torch.float64)
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-9


@pytest.mark.parametrize(
    ("make", "shape", "eps"),
    [
        (MODELS["mlp"][0], MODELS["mlp"][1], False),  # gradients with respect to the outputs themselves
        (MODELS["conv_same_reflect_circular"][0], MODELS["conv_same_reflect_circular"][1], True),  # ReLU(inplace)
        (_ConstantBranch, (6,), True),
    ],
    ids=["direct", "inplace_relu", "constant_branch"],
)
def test_outputs_changed_in_place_or_constant_fall_back_to_added_zeros(make, shape, eps):
    model = make().double()
    x = torch.randn(8, *shape, dtype=torch.float64)
    layers = _structured.plan(model, {name for name, _ in model.named_parameters()})
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    state = {k: v.detach() for k, v in state.items()}
    if eps:
        with pytest.raises(_structured.OutputChanged):
            _structured.capture(model, state, layers, x)
    direct_or_eps = _structured.capture(model, state, layers, x, eps=eps)
    with_eps = _structured.capture(model, state, layers, x, eps=True)
    for (a1, g1), (a2, g2) in zip(direct_or_eps, with_eps, strict=True):
        assert torch.equal(a1, a2) and torch.allclose(g1, g2, rtol=0, atol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to vmap: the structured engine handles all three
        kernel = empirical_ntk(model, x, implementation="structured", dtype=torch.float64)
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-9


class _ShiftsItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.body, self.head = nn.Linear(5, 7), nn.Linear(7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x -= 0.5  # in place, on the tensor it was given
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize(
    "make",
    [lambda: seeded(8, nn.ReLU(inplace=True), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)), _ShiftsItsInput],
    ids=["relu_inplace_on_the_input", "input_shifted_in_place"],
)
def test_a_model_that_changes_its_input_in_place(make):
    """Each capture works on its own copy of the chunk: exact, and the caller's tensor is left alone."""
    model = make().double()
    x = torch.randn(9, 5, dtype=torch.float64)
    before = x.clone()
    kernel = empirical_ntk(model, x, implementation="structured", dtype=torch.float64, batch_size=4)
    assert torch.equal(x, before)
    assert relative_error(kernel, reference_ntk(model, x.clone())) < 1e-9


def test_integer_inputs_give_a_kernel_in_the_computation_dtype():
    torch.manual_seed(9)
    embed = nn.Embedding(10, 4).requires_grad_(False)
    model = nn.Sequential(embed, nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randint(0, 10, (7, 3))
    for implementation in ("structured", "materialised", "vmap"):
        kernel = empirical_ntk(model, x, implementation=implementation, dtype=torch.float64)
        assert kernel.dtype == torch.float64
        assert relative_error(kernel, reference_ntk(model, x)) < 1e-9


class _DoubledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0  # not the layer's own output: the structured form would be off by 2


def test_a_layer_that_overrides_forward_falls_back_to_vmap():
    torch.manual_seed(11)
    model = nn.Sequential(_DoubledLinear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="overrides Linear.forward"):
        kernel = empirical_ntk(model, x, dtype=torch.float64)
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-9


@pytest.mark.parametrize("in_place", [False, True])
def test_forward_hooks_that_change_a_layers_output_are_exact(in_place):
    """The capture's hook runs before the module's own hooks, so G is always for the layer's own output."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    model[0].register_forward_hook(lambda module, args, out: out.mul_(2.0) if in_place else out * 2.0)
    x = torch.randn(6, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        kernel = empirical_ntk(model, x, implementation="structured", dtype=torch.float64)
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-9


# ------------------------------------------------------------------ concurrent capture (CPU)
def _capture_threads(monkeypatch) -> list[str]:
    """The names of the threads that capture each chunk, recorded as they go."""
    names: list[str] = []
    original = empirical._Engine._capture

    def spy(self, *args):
        names.append(threading.current_thread().name)
        return original(self, *args)

    monkeypatch.setattr(empirical._Engine, "_capture", spy)
    return names


def _concurrent(monkeypatch, workers: int = 2) -> list[str]:
    """Capture with ``workers`` threads; the first capture in each worker thread waits (up to 10 s) until two
    threads are capturing at once, so a test fails unless chunks really run side by side. Returns the names
    of the threads that captured each chunk."""
    monkeypatch.setenv(_cpu.WORKERS_VARIABLE, str(workers))
    barrier, seen, names = threading.Barrier(2, timeout=10), set(), []
    original = empirical._Engine._capture

    def spy(self, model, layers, x, block):
        name = threading.current_thread().name
        names.append(name)
        if name.startswith("afterkernel-capture") and name not in seen and len(seen) < 2:
            seen.add(name)
            barrier.wait()
        return original(self, model, layers, x, block)

    monkeypatch.setattr(empirical._Engine, "_capture", spy)
    return names


@pytest.mark.parametrize("name", list(MODELS))
def test_concurrent_capture_gives_the_exact_kernel(monkeypatch, name):
    names = _concurrent(monkeypatch, workers=3)
    make, shape = MODELS[name]
    model = make()
    torch.manual_seed(11)
    x1, x2 = torch.randn(13, *shape), torch.randn(6, *shape)
    threads = torch.get_num_threads()
    options = dict(implementation="structured", dtype=torch.float64, batch_size=2)
    gram = empirical_ntk(model, x1, **options)
    k_train, k_test = empirical_ntk_train_test(model, x1, x2, **options)
    assert sum(n.startswith("afterkernel-capture") for n in names) >= 2 * 7  # 7 chunks of x1, 4 of [x1; x2]
    assert torch.get_num_threads() == threads
    expected = reference_ntk(model, x1)
    assert relative_error(gram, expected) < 1e-9 and torch.equal(gram, gram.T)
    assert relative_error(k_train, expected) < 1e-9
    assert relative_error(k_test, reference_ntk(model, x2, x1)) < 1e-9


class _Stashes(nn.Module):
    """Keeps its hidden layer on ``self`` between two statements of ``forward``: threads sharing one module
    would read each other's activations (the sleep lets the other thread write in between)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.body, self.head = nn.Linear(6, 5), nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.hidden = torch.tanh(self.body(x))
        time.sleep(0.002)
        return self.head(self.hidden)


def test_each_worker_runs_its_own_replica_of_the_model(monkeypatch):
    names = _concurrent(monkeypatch)
    model = _Stashes().double()
    x = torch.randn(40, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back to the general path either
        kernel = empirical_ntk(model, x, dtype=torch.float64, batch_size=1)
    assert len({n for n in names if n.startswith("afterkernel-capture")}) == 2
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-12
    assert not model.body._forward_hooks and not model.head._forward_hooks  # the original is left as it was


class _Escapes(nn.Module):
    """Calls its head through a plain list, which a replica shares with the original: a replica's forward
    would run the original's head, outside the replica's hooks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.body, self.head = nn.Linear(6, 5), nn.Linear(5, 1)
        self.route = [self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route[0](torch.tanh(self.body(x)))


@pytest.mark.parametrize("form", ["structured", "materialised"])
def test_a_model_whose_forward_escapes_its_replica_is_captured_serially(monkeypatch, form):
    names = _concurrent(monkeypatch)  # (were the replica used, two workers would run at once)
    force_forms(monkeypatch, form)
    model = _Escapes().double()
    x = torch.randn(9, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel = empirical_ntk(model, x, implementation="structured", dtype=torch.float64, batch_size=2)
    assert names and all(n == threading.current_thread().name for n in names)
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-12


class _FailsOnMarker(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x == 99).any():
            raise ValueError("marker example reached")
        return self.lin(x)


def test_an_error_in_a_worker_is_raised_and_the_thread_count_restored(monkeypatch):
    monkeypatch.setenv(_cpu.WORKERS_VARIABLE, "2")
    threads = torch.get_num_threads()
    x = torch.randn(20, 3)
    x[13, 0] = 99
    with pytest.raises(ValueError, match="marker example reached"):
        empirical_ntk(_FailsOnMarker(), x, batch_size=2)
    assert torch.get_num_threads() == threads


def test_a_second_engine_captures_serially_while_one_captures_concurrently(monkeypatch):
    monkeypatch.setenv(_cpu.WORKERS_VARIABLE, "2")
    names = _capture_threads(monkeypatch)
    make, shape = MODELS["batchnorm"]
    model, x = make(), torch.randn(10, *shape)
    with _cpu._CONCURRENT:  # as if another thread's engine were capturing concurrently
        kernel = empirical_ntk(model, x, dtype=torch.float64, batch_size=2)
    assert names and not any(n.startswith("afterkernel-capture") for n in names)
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-9


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_worker_count_is_refused(monkeypatch, value):
    monkeypatch.setenv(_cpu.WORKERS_VARIABLE, value)
    with pytest.raises(ConfigurationError, match=f"AFTERKERNEL_CPU_WORKERS='{value}' must be a positive"):
        empirical_ntk(MODELS["mlp"][0](), torch.randn(4, 3, 4))


def test_the_former_variable_still_counts_the_workers_with_a_deprecation_warning(monkeypatch):
    monkeypatch.delenv(_cpu.WORKERS_VARIABLE, raising=False)
    monkeypatch.setenv(_cpu.DEPRECATED_VARIABLE, "2")
    names = _capture_threads(monkeypatch)
    model = _Stashes().double()  # a forward of its own: serial unless the user asks for workers
    x = torch.randn(12, 6, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="AFTERKERNEL_CAPTURE_WORKERS is deprecated; set AFTERKERNEL_CPU_W"):
        kernel = empirical_ntk(model, x, dtype=torch.float64, batch_size=2)
    assert any(n.startswith("afterkernel-capture") for n in names)
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-12
    names.clear()
    monkeypatch.setenv(_cpu.WORKERS_VARIABLE, "1")  # the new name wins, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empirical_ntk(model, x, dtype=torch.float64, batch_size=2)
    assert names and not any(n.startswith("afterkernel-capture") for n in names)
    monkeypatch.delenv(_cpu.WORKERS_VARIABLE)
    monkeypatch.setenv(_cpu.DEPRECATED_VARIABLE, "two")
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigurationError, match="AFTERKERNEL_CAPTURE_WORKERS='two'"):
        empirical_ntk(model, x)


def test_a_replica_shares_the_tensors_and_owns_its_modules_and_hooks():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 1))
    model.register_buffer("scale", torch.ones(1))
    layers = [_structured.Layer("3", model[3], "3.weight", "3.bias")]
    replica, mapped = _cpu.replicate(model, layers)
    assert type(replica) is nn.Sequential and replica is not model and replica[0] is replica[2]
    assert replica[0] is not shared and mapped[0].module is replica[3] and layers[0].module is model[3]
    assert replica[0].weight is shared.weight and replica.scale is model.scale
    x = torch.randn(2, 4)
    assert torch.equal(replica(x), model(x))
    replica[3].register_forward_hook(lambda *args: None)
    replica[0].weight = nn.Parameter(torch.zeros(4, 4))  # what functional_call does to the replica's modules
    assert not model[3]._forward_hooks and model[0].weight is shared.weight and replica[2].weight is not shared.weight


def test_shards_agree_whatever_each_ranks_memory_budget_chunk_and_retries(monkeypatch):
    """Ranks may have different free memory (the default budget), batch sizes, or halve their budget and strips
    after running out of memory: the work must still be cut alike, or the summed shards miss and double entries."""
    make, shape = MODELS["mlp"]
    model = make().double()
    x1, x2 = torch.randn(70, *shape, dtype=torch.float64), torch.randn(23, *shape, dtype=torch.float64)
    per_example = 8 * (12 + 1 + 7 + 7 + 1 + 5 + 6)
    ranks = [  # (memory budget, batch size, out-of-memory failures before it fits)
        (None, None, 0),
        (24 * per_example / empirical.RESIDENT_SHARE, 3, 1),  # after the retry: several panels, shorter strips
        (30 * per_example / empirical.RESIDENT_SHARE, 7, 2),
    ]
    failures = [0]
    original = empirical._Engine.factors

    def factors(self, x):
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return original(self, x)

    monkeypatch.setattr(empirical._Engine, "factors", factors)
    calls = {
        "gram": (lambda **kw: empirical_ntk(model, x1, **kw), reference_ntk(model, x1)),
        "cross": (lambda **kw: empirical_ntk(model, x1, x2, **kw), reference_ntk(model, x1, x2)),
        "paired": (lambda **kw: empirical_ntk(model, x1, paired=True, **kw), reference_ntk(model, x1).diagonal()),
        "train_test": (
            lambda **kw: torch.cat(empirical_ntk_train_test(model, x1, x2, **kw)),
            torch.cat([reference_ntk(model, x1), reference_ntk(model, x2, x1)]),
        ),
        "views": (
            lambda **kw: empirical_ntk_views(model, [x1, -x1], **kw)[:, 0, 1],
            reference_ntk(model, x1, -x1).diagonal(),
        ),
    }
    for name, (call, expected) in calls.items():
        parts = []
        for rank, (budget, batch_size, retries) in enumerate(ranks):
            failures[0] = retries
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the retries' warnings
                options = dict(memory_budget=budget, batch_size=batch_size, dtype=torch.float64)
                parts.append(call(shard=(rank, len(ranks)), **options))
        assert relative_error(sum(parts), expected) < 1e-12, name
        assert int(torch.stack([part != 0 for part in parts]).sum(0).max()) == 1, name


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


class _HookStash(nn.Module):
    """Hands an activation from a hook (a bound method of the model) to its forward through ``self``: a replica
    shares the bound method with the original, so its forward would read the original's attribute."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(14)
        self.stem, self.body, self.head = nn.Linear(6, 6), nn.Linear(6, 5), nn.Linear(5, 1)
        self.stem.register_forward_hook(self._grab)

    def _grab(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.feat = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stem(x)
        return self.head(torch.tanh(self.body(self.feat)))


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize(
    ("make", "concurrent"),
    [
        (lambda: MODELS["conv_strided_padded"][0](), True),  # torch.nn classes only
        (lambda: _PaperVGG(), True),  # declares afterkernel_stateless_forward
        (lambda: _HookStash(), False),  # a forward of its own (and hooks)
        (lambda: _PaperVGG(subclass=True), False),  # a subclass does not inherit the promise
    ],
    ids=["sequential", "paper_vgg", "own_forward", "subclass"],
)
def test_without_the_variable_only_known_stateless_models_are_captured_concurrently(monkeypatch, make, concurrent):
    monkeypatch.delenv(_cpu.WORKERS_VARIABLE, raising=False)
    names = _capture_threads(monkeypatch)
    model = make().double()
    shape = (2, 7, 8) if isinstance(model, nn.Sequential) else (6,) if isinstance(model, _HookStash) else (1, 8, 8)
    x = torch.randn(30, *shape, dtype=torch.float64)
    kernel = empirical_ntk(model, x, dtype=torch.float64, batch_size=2)
    assert any(n.startswith("afterkernel-capture") for n in names) is concurrent
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-12


def _PaperVGG(subclass: bool = False) -> nn.Module:  # noqa: N802 (a factory named like the class it builds)
    from lightning_afterkernel.models import VGGClassifier

    torch.manual_seed(15)
    cls = type("SubVGG", (VGGClassifier,), {}) if subclass else VGGClassifier
    return cls(input_shape=(1, 8, 8), width=4)


def test_the_obstacle_names_the_module_and_its_hooks():
    def obstacle(model: nn.Module, x: torch.Tensor) -> str | None:
        with _cpu.recording_calls(model) as called:
            model(x)
        return _cpu.concurrency_obstacle(model, called)

    model = seeded(0, nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
    model[2].spare = _HookStash()  # a submodule Linear.forward never calls: no obstacle
    x = torch.randn(2, 6)
    assert obstacle(model, x) is None and not model[0]._forward_pre_hooks
    model[1].register_forward_hook(lambda *args: None)
    assert obstacle(model, x) == "module 1 (Tanh) has hooks"
    assert obstacle(_HookStash(), x) == "module <root> (_HookStash) has a forward of its own"
    wrapped = nn.DataParallel(seeded(0, nn.Linear(6, 1)))  # (on CPU it just calls the module)
    assert obstacle(wrapped, x) == "module <root> (DataParallel) has a forward of its own"


@pytest.mark.parametrize("mode", ["autocast", "saved_tensor_hooks"])
def test_thread_local_modes_keep_the_capture_in_the_callers_thread(monkeypatch, mode):
    names = _concurrent(monkeypatch)  # workers asked for, but they would start without the caller's mode
    make, shape = MODELS["mlp"]
    model, x = make(), torch.randn(12, *shape)
    context = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if mode == "autocast"
        else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    )
    with context:
        kernel = empirical_ntk(model, x, batch_size=2)
    assert names and all(n == threading.current_thread().name for n in names)
    assert relative_error(kernel, reference_ntk(model, x)) < (5e-2 if mode == "autocast" else 1e-5)


class _Registry(nn.Module):
    """Looks its layers' settings up in a registry keyed by module object: a replica's modules are not in it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(16)
        self.body, self.head = nn.Linear(6, 5), nn.Linear(5, 1)
        self.scales = weakref.WeakKeyDictionary({self.body: 2.0})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.scales[self.body] * self.body(x)))


def test_a_replica_that_fails_leaves_the_capture_serial(monkeypatch):
    names = _concurrent(monkeypatch)
    model = _Registry().double()
    x = torch.randn(9, 6, dtype=torch.float64)
    kernel = empirical_ntk(model, x, dtype=torch.float64, batch_size=2)
    assert names and all(n == threading.current_thread().name for n in names)
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-12


@pytest.mark.usefixtures("two_threads")
def test_a_compiled_model_is_captured_serially_and_exactly(monkeypatch):
    """The probe's call recording must not trip ``torch.compile``'s tracer (it did, on hooks that kept module
    objects); the compiled wrapper is not a ``torch.nn`` class, so its chunks are captured one after another."""
    monkeypatch.delenv(_cpu.WORKERS_VARIABLE, raising=False)
    model = _PaperVGG().double()
    x = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's recompilation notes
        kernel = empirical_ntk(torch.compile(model, backend="eager"), x, dtype=torch.float64, batch_size=4)
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-12


@pytest.mark.parametrize("implementation", ["auto", "vmap"])
def test_a_model_compiled_with_aot_autograd_gives_the_exact_kernel(implementation):
    """In a graph compiled with AOT autograd the layers' outputs are siblings of the logit, so gradients with
    respect to them came out None and the structured kernel was 0.23 (relative) off; the engine now runs compiled
    code eagerly, and leaves dynamo's stance as it found it."""
    from torch._dynamo import eval_frame

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    stance = eval_frame._stance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes
        compiled = torch.compile(model, backend="aot_eager")
        kernel = empirical_ntk(compiled, x, dtype=torch.float64, implementation=implementation)
        assert eval_frame._stance == stance
        compiled(x)  # compiles afterwards as before
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-12


def test_overlapping_calls_hold_the_compile_stance_until_the_last_one_ends():
    """Two threads' calls: the first to end must not switch compilation back on under the other (a plain save
    and restore per call did, and left "force_eager" set for good)."""
    from torch._dynamo import eval_frame

    before = eval_frame._stance
    entered, first_done, seen = threading.Barrier(2, timeout=10), threading.Event(), {}

    def call(name: str) -> None:
        with _settings.eager():
            entered.wait()
            if name == "second":
                first_done.wait(10)
                seen["after the first ended"] = eval_frame._stance.stance
            else:
                seen["inside"] = eval_frame._stance.stance
        if name == "first":
            first_done.set()

    threads = [threading.Thread(target=call, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen == {"inside": "force_eager", "after the first ended": "force_eager"}
    assert eval_frame._stance == before


def test_a_call_needing_another_setting_waits_for_the_holders_or_raises_when_nested():
    setting, log = _settings.ProcessSetting("demo"), []

    def apply(value):
        log.append(("set", value))
        return lambda: log.append(("restored", value))

    holding, release = threading.Event(), threading.Event()

    def first() -> None:
        with setting.held(False, apply):
            holding.set()
            release.wait(10)
            log.append("first ends")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait(10)
    timer = threading.Timer(0.2, release.set)
    timer.start()
    with setting.held(True, apply):  # waits for the first holder to leave, then sets its own value
        log.append("second runs")
    thread.join(10)
    assert log == [("set", False), "first ends", ("restored", False), ("set", True), "second runs", ("restored", True)]
    with setting.held(False, apply), pytest.raises(ConfigurationError, match="demo=True"):
        with setting.held(True, apply):
            pass


# ------------------------------------------------------------------ Gram strips side by side (CPU)
def _gram_threads(monkeypatch, wait: bool = True) -> list[str]:
    """Every factor matrix counts as wide; records the thread computing each strip, and (``wait``) makes the
    first strip of each of two workers wait (up to 10 s) until both run, so a test fails unless they do."""
    monkeypatch.setattr(_cpu, "CONCURRENT_GRAM_WIDTH", 1)
    barrier, seen, names = threading.Barrier(2, timeout=10), set(), []
    original = empirical._Engine._tile

    def spy(*args):
        name = threading.current_thread().name
        names.append(name)
        if wait and name.startswith("afterkernel-gram") and name not in seen and len(seen) < 2:
            seen.add(name)
            barrier.wait()
        return original(*args)

    monkeypatch.setattr(empirical._Engine, "_tile", staticmethod(spy))
    return names


@pytest.mark.parametrize("name", ["conv_strided_padded", "conv_same_reflect_circular", "batchnorm"])
def test_wide_factors_strips_side_by_side_give_the_exact_kernel(monkeypatch, two_threads, name):
    names = _gram_threads(monkeypatch)
    force_forms(monkeypatch, "materialised")
    monkeypatch.setattr(empirical, "TILE", 5)
    make, shape = MODELS[name]
    model = make()
    torch.manual_seed(14)
    x1, x2 = torch.randn(23, *shape), torch.randn(11, *shape)
    calls = []
    options = dict(dtype=torch.float64, batch_size=4)
    gram = empirical_ntk(model, x1, progress=lambda done, total: calls.append((done, total)), **options)
    assert sum(n.startswith("afterkernel-gram") for n in names) == 2 * 5  # 5 strips of 4-5 rows, halved
    assert calls == [(k, 5) for k in range(1, 6)] and _new_threads_count() == 2
    expected = reference_ntk(model, x1)
    assert relative_error(gram, expected) < 1e-12 and torch.equal(gram, gram.T)
    assert relative_error(empirical_ntk(model, x1, x2, **options), reference_ntk(model, x1, x2)) < 1e-12
    k_train, k_test = empirical_ntk_train_test(model, x1, x2, **options)
    assert relative_error(k_train, expected) < 1e-12 and relative_error(k_test, reference_ntk(model, x2, x1)) < 1e-12
    budget = dict(options, memory_budget=40 * 8 * 60 / empirical.RESIDENT_SHARE)  # panels: columns recomputed
    assert relative_error(empirical_ntk(model, x1, **budget), expected) < 1e-12
    shards = sum(empirical_ntk(model, x1, shard=(rank, 3), **options) for rank in range(3))
    assert relative_error(shards, expected) < 1e-12


def test_narrow_factors_and_one_thread_keep_strips_serial(monkeypatch, two_threads):
    names = _gram_threads(monkeypatch, wait=False)
    monkeypatch.setattr(_cpu, "CONCURRENT_GRAM_WIDTH", 10**9)  # the MLP's structured layers: narrow
    make, shape = MODELS["conv_strided_padded"]
    model, x = make(), torch.randn(12, *shape)
    force_forms(monkeypatch, "materialised")
    empirical_ntk(model, x, dtype=torch.float64)
    monkeypatch.setattr(_cpu, "CONCURRENT_GRAM_WIDTH", 1)
    torch.set_num_threads(1)
    empirical_ntk(model, x, dtype=torch.float64)
    torch.set_num_threads(2)
    with _cpu._CONCURRENT:  # as if another thread's engine were working concurrently
        kernel = empirical_ntk(model, x, dtype=torch.float64)
    assert names and not any(n.startswith("afterkernel-gram") for n in names)
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-12


def _new_threads_count() -> int:
    """torch's thread count in a thread started now (set_num_threads also sets the default of later threads)."""
    counts = []
    thread = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return counts[0]


def test_an_error_in_a_strip_is_raised_the_rest_cancelled_and_threads_and_lock_restored(monkeypatch, two_threads):
    _gram_threads(monkeypatch, wait=False)
    force_forms(monkeypatch, "materialised")
    monkeypatch.setattr(empirical, "TILE", 4)
    names = []

    def fails(f1, f2, rows, cols, offset1, offset2):
        names.append(threading.current_thread().name)
        if rows.start == 0:
            raise ValueError("strip failed")
        time.sleep(0.2)
        return torch.zeros(rows.stop - rows.start, cols.stop - cols.start, dtype=torch.float64)

    monkeypatch.setattr(empirical._Engine, "_tile", staticmethod(fails))
    make, shape = MODELS["conv_strided_padded"]
    with pytest.raises(ValueError, match="strip failed"):
        empirical_ntk(make(), torch.randn(16, *shape), dtype=torch.float64)
    assert names and all(name.startswith("afterkernel-gram") for name in names)
    assert len(names) < 8  # 4 strips cut in half: those not yet started when the first failed never ran
    assert torch.get_num_threads() == 2 and _new_threads_count() == 2
    assert not _cpu._CONCURRENT.locked()


def test_progress_that_raises_releases_the_strips_workers_and_lock(monkeypatch, two_threads):
    _gram_threads(monkeypatch, wait=False)
    force_forms(monkeypatch, "materialised")
    monkeypatch.setattr(empirical, "TILE", 4)
    make, shape = MODELS["conv_strided_padded"]

    def stop(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        empirical_ntk(make(), torch.randn(16, *shape), dtype=torch.float64, progress=stop)
    assert not _cpu._CONCURRENT.locked() and _new_threads_count() == 2


def test_strips_are_cut_into_a_part_per_worker_asked(monkeypatch, two_threads):
    monkeypatch.setenv(_cpu.WORKERS_VARIABLE, "3")
    names = _gram_threads(monkeypatch, wait=False)
    force_forms(monkeypatch, "materialised")
    monkeypatch.setattr(empirical, "TILE", 6)
    make, shape = MODELS["conv_same_reflect_circular"]
    model, x = make(), torch.randn(23, *shape)
    kernel = empirical_ntk(model, x, dtype=torch.float64, batch_size=4)
    assert sum(n.startswith("afterkernel-gram") for n in names) == 3 * 4  # 4 strips of 5-6 rows, in thirds
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-12 and torch.equal(kernel, kernel.T)
    parts = _cpu._row_parts(slice(10, 17), slice(10, 40), 3, upper=True)  # a strip from the diagonal on
    assert parts == [(slice(10, 12), slice(10, 40)), (slice(12, 14), slice(12, 40)), (slice(14, 17), slice(14, 40))]
    parts = _cpu._row_parts(slice(10, 12), slice(30, 40), 3, upper=True)  # off the diagonal; fewer rows than parts
    assert parts == [(slice(10, 11), slice(30, 40)), (slice(11, 12), slice(30, 40))]


def test_one_worker_keeps_the_capture_and_the_strips_in_the_calling_thread(monkeypatch, two_threads):
    monkeypatch.setenv(_cpu.WORKERS_VARIABLE, "1")
    strips = _gram_threads(monkeypatch, wait=False)  # every factor matrix counts as wide
    captures = _capture_threads(monkeypatch)
    force_forms(monkeypatch, "materialised")
    make, shape = MODELS["conv_strided_padded"]
    model, x = make(), torch.randn(12, *shape)
    kernel = empirical_ntk(model, x, dtype=torch.float64, batch_size=2)
    assert strips and captures and set(strips) == set(captures) == {threading.current_thread().name}
    assert relative_error(kernel, reference_ntk(model, x)) < 1e-12


@pytest.mark.parametrize("threads", [1, 2])
def test_the_paper_vgg_kernel_is_bitwise_repeatable(threads):
    """Every operation of the engine is deterministic for a thread count: repeated calls give the same bits,
    side by side on workers (two threads) or not."""
    from lightning_afterkernel.models import VGGClassifier

    torch.manual_seed(0)
    model = VGGClassifier(input_shape=(1, 28, 28), num_parameters=20_000)
    x = torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = empirical_ntk(model, x, batch_size=8)
        k_train, k_test = empirical_ntk_train_test(model, x[:20], x[20:], batch_size=8)
        assert torch.equal(empirical_ntk(model, x, batch_size=8), first)
        again = empirical_ntk_train_test(model, x[:20], x[20:], batch_size=8)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(again[0], k_train) and torch.equal(again[1], k_test)


# ------------------------------------------------------------------ thin products of the factors
def _uneven_factors(rows: int, width: int, seed: int) -> torch.Tensor:
    """Rows of per-example gradients whose parameters differ in scale, as real ones do."""
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(rows, width, generator=g) * torch.rand(width, generator=g)
    jac[:, : width // 20] *= 30
    return jac


@pytest.fixture(scope="module")
def uneven_products() -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors of 600 examples, the float64 products of the first 300 with the last 300, and the float32 error of
    that wide product."""
    jac = _uneven_factors(600, 95_000, seed=0)
    exact = jac[:300].double() @ jac[300:].double().T
    return jac, exact, relative_error(jac[:300] @ jac[300:].T, exact)


@pytest.mark.parametrize(("m", "n"), [(1, 300), (6, 6), (300, 3), (12, 40)])
def test_thin_factor_products_are_as_accurate_as_wide_ones(uneven_products, m, n):
    """MKL multiplies matrices with a few rows on a side by one running sum per entry over all parameters (4e-6
    to 4e-5 from float64 where a wide product is 6e-7); gram sums them in blocks of parameters instead: within 2x
    of MKL's wide product for every shape."""
    jac, exact, wide = uneven_products
    out = torch.empty(m, n)
    _gram._factor_product(jac[:m], jac[300 : 300 + n], out)
    assert relative_error(out, exact[:m, :n]) < 2 * wide


def test_only_thin_float32_products_on_the_cpu_are_summed_in_blocks(monkeypatch):
    """Which products are summed in blocks, with meta tensors standing in for a GPU's: the thin float32 ones on
    CPU; GPUs keep cuBLAS's one product (on an H200, blocks changed nothing: the error is in the factors)."""
    wide, thin = torch.empty(300, 5000), torch.empty(3, 5000)
    assert _gram._k_block(wide, wide) is None and _gram._k_block(thin, wide) == _gram.K_BLOCK
    assert _gram._k_block(thin.double(), wide.double()) is None
    assert _gram._k_block(thin.to("meta"), wide.to("meta")) is None
    calls = []
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, a, b: calls.append(a.shape[1]) or self)
    _gram._factor_product(thin, wide, torch.empty(3, 300))
    assert calls == [2048, 5000 - 2 * 2048]


@pytest.mark.usefixtures("two_threads")
def test_a_kernel_of_a_few_examples_is_as_accurate_as_the_tutorials():
    """Twelve examples: the concurrent strips' halves end in a 6 x 6 corner, which MKL's thin product put 1e-6
    from float64 (the tutorial 6e-8); one test example against training images was 3.7e-7 against 1.4e-7."""
    from lightning_afterkernel.models import VGGClassifier

    torch.manual_seed(2)
    model = VGGClassifier(input_shape=(1, 28, 28))
    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    expected = reference_ntk(model, x)
    tutorial = relative_error(reference_ntk(model, x, dtype=torch.float32), expected)
    assert relative_error(empirical_ntk(model, x), expected) < max(2e-7, 3 * tutorial)
