"""Invariance scores against a direct computation: reference_ntk (float64) for the NTK, features for the CK."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from lightning_afterkernel.errors import ConfigurationError, KernelError, ModelError
from lightning_afterkernel.invariance import (
    PAPER_FAMILIES,
    invariance_score,
    invariance_scores,
    kernel_cosines,
    patch_shuffle,
    quadrant_swap,
    rotate,
)
from lightning_afterkernel.invariance import scores as scores_module
from lightning_afterkernel.kernels import empirical_ntk_views, reference_ntk


class TinyMLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 6, bias=bias), nn.ReLU(), nn.Linear(6, 5, bias=bias), nn.ReLU()
        )
        self.head = nn.Linear(5, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(3 * 7 * 7, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SumModel(nn.Module):
    """The paper's "Sum" network: sum of the pixels, Dense(relu), Dense(1); blind to where pixels are."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(1, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x.sum((1, 2, 3))[:, None])))


def make(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def direct_ntk_cosines(model: nn.Module, x: torch.Tensor, transform) -> torch.Tensor:
    n = len(x)
    k = reference_ntk(model, torch.cat([x, transform(x)]))
    return k.diagonal(n) / (k.diagonal()[:n] * k.diagonal()[n:]).sqrt()


def direct_ck_cosines(model: nn.Module, x: torch.Tensor, transform) -> torch.Tensor:
    with torch.no_grad():
        phi, phi_t = model.double().features(x.double()), model.features(transform(x).double())
    model.float()
    return (phi * phi_t).sum(1) / (phi.norm(dim=1) * phi_t.norm(dim=1))


@pytest.mark.parametrize("cls", [TinyMLP, TinyConv])
@pytest.mark.parametrize("family", ["globalness", "shift", "rotation", "zoom"])
def test_ntk_scores_match_reference_ntk(cls, family, x):
    model = make(cls)
    transforms = PAPER_FAMILIES[family]
    expected = torch.stack([direct_ntk_cosines(model, x, t) for t in transforms])
    cosines = kernel_cosines(model, x, transforms, dtype=torch.float64)
    assert cosines.dtype == torch.float64 and cosines.shape == (len(transforms), len(x))
    assert torch.allclose(cosines, expected, rtol=1e-10, atol=0)
    score = invariance_score(model, x, family, dtype=torch.float64)
    assert score == pytest.approx(float(expected.mean()), rel=1e-10)
    assert 0.0 < score < 1.0 - 1e-4  # none of these transforms leaves a random image unchanged


@pytest.mark.parametrize("cls", [TinyMLP, TinyConv])
def test_ck_scores_match_features(cls, x):
    model = make(cls, seed=2)
    for family, transforms in PAPER_FAMILIES.items():
        expected = torch.stack([direct_ck_cosines(model, x, t) for t in transforms])
        cosines = kernel_cosines(model, x, transforms, kernel="ck", dtype=torch.float64)
        assert torch.allclose(cosines, expected, rtol=1e-10, atol=0), family
    shuffle = partial(patch_shuffle, block_size=7, seed=0)
    assert invariance_score(model, x, shuffle, kernel="ck", dtype=torch.float64) == pytest.approx(
        float(direct_ck_cosines(model, x, shuffle).mean()), rel=1e-10
    )


def test_invariance_scores_equal_the_single_scores_and_share_the_diagonal(x, monkeypatch):
    model = make(TinyConv, seed=3)
    single = {name: invariance_score(model, x, name, dtype=torch.float64) for name in PAPER_FAMILIES}
    calls = []

    def spy(model, views, **options):
        calls.append(([len(v) for v in views], options.get("batch_size")))
        return empirical_ntk_views(model, views, **options)

    monkeypatch.setitem(scores_module._KERNELS, "ntk", spy)
    together = invariance_scores(model, x, dtype=torch.float64, batch_size=5)  # options reach the kernel
    assert together.keys() == single.keys()
    for name in single:
        assert together[name] == pytest.approx(single[name], rel=1e-12)
    n, k = len(x), 6  # six transforms in the four paper families
    # one call on the n images and their k transforms: (k + 1) n per-example gradients, no n x n matrix
    assert calls == [([n] * (k + 1), 5)]


def test_families_by_name_or_mapping(x):
    model = make(TinyMLP)
    mine = {"swap": quadrant_swap, "turns": [partial(rotate, angle=a) for a in (0.1, -0.1)], "shift": "shift"}
    scores = invariance_scores(model, x, mine, dtype=torch.float64)
    assert scores["swap"] == pytest.approx(invariance_score(model, x, "globalness", dtype=torch.float64), rel=1e-12)
    assert scores["shift"] == pytest.approx(invariance_score(model, x, "shift", dtype=torch.float64), rel=1e-12)
    turns = (direct_ntk_cosines(model, x, mine["turns"][0]) + direct_ntk_cosines(model, x, mine["turns"][1])) / 2
    assert scores["turns"] == pytest.approx(float(turns.mean()), rel=1e-10)
    assert invariance_scores(model, x, ["zoom"], dtype=torch.float64).keys() == {"zoom"}


def test_identity_scores_one_and_a_position_blind_model_ignores_permutations(x):
    assert invariance_score(make(TinyConv), x, lambda b: b.clone(), dtype=torch.float64) == pytest.approx(
        1.0, abs=1e-12
    )
    blind = make(SumModel)
    assert invariance_score(blind, x, "globalness", dtype=torch.float64) == pytest.approx(1.0, abs=1e-12)
    shuffle = partial(patch_shuffle, block_size=4, seed=0)
    assert invariance_score(blind, x, shuffle, dtype=torch.float64) == pytest.approx(1.0, abs=1e-12)
    assert (
        invariance_score(blind, x, "shift", dtype=torch.float64) < 1.0 - 1e-9
    )  # a shift drops pixels: the sum changes


def test_float32_default_is_close_to_float64(x):
    model = make(TinyConv)
    assert invariance_score(model, x, "rotation") == pytest.approx(
        invariance_score(model, x, "rotation", dtype=torch.float64), abs=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"transform": "scale"}, "unknown transform family 'scale'.*'globalness'"),
        ({"transform": []}, "non-empty sequence of callables"),
        ({"transform": [quadrant_swap, 3]}, "non-empty sequence of callables"),
        ({"transform": lambda b: b[:, :, :-1]}, "must return a batch of x's shape"),
        ({"transform": "shift", "kernel": "rbf"}, "'ntk'.*or 'ck'"),
    ],
)
def test_bad_arguments(kwargs, match, x):
    with pytest.raises(ConfigurationError, match=match):
        invariance_score(make(TinyMLP), x, **kwargs)


def test_bad_families():
    model, x = make(TinyMLP), torch.rand(2, 1, 28, 28)
    with pytest.raises(ConfigurationError, match="not the string 'shift'"):
        invariance_scores(model, x, "shift")
    with pytest.raises(ConfigurationError, match="families is empty"):
        invariance_scores(model, x, [])
    with pytest.raises(ConfigurationError, match=r"\(n, C, H, W\)"):
        invariance_scores(model, x.flatten(1))
    with pytest.raises(ConfigurationError, match="even height"):
        invariance_scores(model, torch.rand(2, 1, 27, 27), ["globalness"])


def test_zero_self_similarity_is_refused():
    model = make(partial(TinyMLP, bias=False))  # zero input -> zero features through bias-free ReLU layers
    x = torch.rand(3, 1, 28, 28)
    x[1] = 0.0
    with pytest.raises(KernelError, match=r"K\(x_i, x_i\) <= 0 for 1 of 3 images \(first: i = 1\) of the ck kernel"):
        invariance_score(model, x, "shift", kernel="ck")
    with pytest.raises(KernelError, match=r"K\(T x_i, T x_i\) <= 0 for 3 of 3 .* on <lambda>"):
        invariance_score(model, torch.rand(3, 1, 28, 28), lambda b: torch.zeros_like(b), kernel="ck")


def test_non_finite_kernels_and_featureless_models_are_refused(x):
    model = make(TinyMLP)
    with torch.no_grad():
        model.head.weight.fill_(float("inf"))
    with pytest.raises(KernelError, match="non-finite"):
        invariance_score(model, x, "zoom")
    with pytest.raises(ModelError, match="features"):
        invariance_score(make(SumModel), x, "zoom", kernel="ck")
