"""Channels-last max-pooling inside the capture: bitwise the NCHW operator, used only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_afterkernel.kernels import _layouts, empirical_ntk, reference_ntk
from lightning_afterkernel.kernels._layouts import ChannelsLastMaxPool, uses_max_pool

CASES = [  # (shape, kernel, stride, padding, dilation, ceil_mode)
    ((3, 8, 28, 28), 2, None, 0, 1, True),
    ((3, 8, 7, 9), 3, 2, 1, 1, True),  # odd sizes: ceil_mode adds a partial window
    ((2, 5, 11, 13), 3, 1, 1, 2, False),
    ((2, 6, 10, 10), (2, 3), (1, 2), (1, 0), 1, False),
    ((2, 4, 5, 5), 2, 2, 0, 1, False),
]


def _input(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 0.0  # a plane of ties: the first index in each window must win in both layouts
    x[1, 1, 0, :3] = 7.0  # ties at a maximum
    x[1, 2, 2, 2] = float("nan")  # NaN propagates, and its index is taken
    return x.requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=[str(c[0]) for c in CASES])
def test_channels_last_pooling_is_bitwise_the_nchw_operator(case, dtype):
    shape, kernel, stride, padding, dilation, ceil_mode = case
    x = _input(shape, dtype)
    args = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    expected, expected_indices = F.max_pool2d(x, return_indices=True, **args)
    with ChannelsLastMaxPool():
        pooled, indices = F.max_pool2d(x, return_indices=True, **args)
        direct = F.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)[0]
        module = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)(x)
    assert type(pooled.grad_fn).__name__ == "_MaxPool2dChannelsLastBackward"
    assert pooled.is_contiguous() and indices.is_contiguous()
    assert torch.equal(indices, expected_indices)
    for result in (pooled, direct, module):
        assert torch.equal(result.nan_to_num(), expected.nan_to_num()) and torch.equal(result.isnan(), expected.isnan())
    upstream = torch.randn(expected.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    (want,) = torch.autograd.grad(expected, x, upstream)
    (got,) = torch.autograd.grad(pooled, x, upstream)
    assert torch.equal(got, want) and got.is_contiguous()


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(2, 3, 8, 8),  # too few channels to gain
        torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last),  # already channels-last
        torch.randn(8, 8, 8),  # unbatched
        torch.randn(2, 8, 8, 8, dtype=torch.float16),
    ],
    ids=["3_channels", "channels_last_input", "unbatched", "float16"],
)
def test_other_inputs_take_the_ordinary_operator(x):
    x.requires_grad_(True)
    with ChannelsLastMaxPool():
        pooled = F.max_pool2d(x, 2)
    assert "ChannelsLast" not in type(pooled.grad_fn).__name__
    assert torch.equal(pooled, F.max_pool2d(x, 2))


class _PoolNet(nn.Module):
    def __init__(self, pool: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True) if pool else nn.Identity()
        self.head = nn.Linear(6 * (3 if pool else 7) ** 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


@pytest.mark.parametrize("pool", [True, False])
def test_the_capture_pools_channels_last_only_in_models_with_max_pooling(monkeypatch, pool):
    calls = []
    original = ChannelsLastMaxPool.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        calls.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(ChannelsLastMaxPool, "__torch_function__", spy)
    model = _PoolNet(pool)
    assert uses_max_pool(model) is pool
    x = torch.randn(11, 2, 7, 7, dtype=torch.float64)
    kernel = empirical_ntk(model, x, implementation="materialised", dtype=torch.float64)
    assert (F.max_pool2d in calls) is pool and (len(calls) > 0) is pool
    assert float((kernel - reference_ntk(model, x)).norm() / kernel.norm()) < 1e-12


def test_the_channel_threshold_is_documented_where_it_is_used():
    x = torch.randn(1, _layouts.MIN_CHANNELS, 4, 4)
    assert _layouts._eligible(x) and not _layouts._eligible(x[:, :-1].contiguous())


class _VmappedPool(nn.Module):
    """Pools each example through ``torch.vmap`` inside its forward: the channels-last Function has no functorch
    rules, so such calls must take the ordinary operator."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv, self.pool, self.head = nn.Conv2d(2, 6, 3, padding=1), nn.MaxPool2d(2), nn.Linear(6 * 3 * 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.head(torch.vmap(lambda one: self.pool(one.unsqueeze(0)).squeeze(0))(h).flatten(1))


def test_pooling_under_functorch_transforms_takes_the_ordinary_operator():
    model = _VmappedPool().double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    kernel = empirical_ntk(model, x, dtype=torch.float64)
    assert float((kernel - reference_ntk(model, x)).norm() / kernel.norm()) < 1e-12
