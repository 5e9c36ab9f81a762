"""Paper architectures: exact parameter counts, shapes, initialisation, training behaviour, errors."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.models import MLPClassifier, VGGClassifier

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)


@pytest.mark.parametrize(
    ("cls", "shape", "width", "count"),
    [
        (VGGClassifier, MNIST, 38, 95_267),
        (VGGClassifier, CIFAR, 37, 92_205),
        (MLPClassifier, MNIST, 94, 100_675),
        (MLPClassifier, CIFAR, 32, 101_537),
    ],
)
def test_default_budget_gives_paper_widths_and_counts(cls, shape, width, count):
    model = cls(input_shape=shape)
    assert model.width == width
    assert model.num_parameters() == count


def test_explicit_width_overrides_budget():
    assert MLPClassifier(width=10).width == 10
    assert VGGClassifier(width=4, num_parameters=1).width == 4


def test_vgg_architecture_matches_paper():
    model = VGGClassifier(input_shape=MNIST)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 38), (38, 38), (38, 76), (76, 76)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    x = torch.rand(5, *MNIST)
    assert model.features(x).shape == (5, 76 * 7 * 7)
    assert model(x).shape == (5,)


def test_mlp_architecture_matches_paper():
    model = MLPClassifier(input_shape=CIFAR)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3072, 32)] + [(32, 32)] * 3 + [(32, 1)]
    x = torch.rand(3, *CIFAR)
    assert model.features(x).shape == (3, 32)
    assert model(x).shape == (3,)


def test_features_feed_head():
    model = VGGClassifier(input_shape=CIFAR, width=4)
    x = torch.rand(4, *CIFAR)
    torch.testing.assert_close(model(x), model.head(model.features(x)).squeeze(-1))


def test_glorot_init_zero_biases_and_bounds():
    torch.manual_seed(0)
    model = VGGClassifier(input_shape=MNIST, width=8)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.count_nonzero(m.bias) == 0
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
            bound = (6.0 / (fan_in + fan_out)) ** 0.5
            assert m.weight.abs().max() <= bound
            assert m.weight.abs().max() > 0.8 * bound  # uniform over the whole range, not a smaller one


def test_torch_init_keeps_nonzero_biases():
    model = MLPClassifier(width=8, init="torch")
    assert any(torch.count_nonzero(m.bias) > 0 for m in model.modules() if isinstance(m, nn.Linear))


def test_optimizer_is_plain_sgd():
    opt = MLPClassifier(width=8, lr=0.05).configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert group["lr"] == 0.05 and group["momentum"] == 0 and group["weight_decay"] == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"init": "he"},
        {"input_shape": (28, 28)},
        {"width": 0},
        {"depth": 0},
    ],
)
def test_mlp_bad_arguments(kwargs):
    with pytest.raises(ConfigurationError):
        MLPClassifier(**kwargs)


@pytest.mark.parametrize("kwargs", [{"kernel_size": 2}, {"num_blocks": 0}, {"width": -1}])
def test_vgg_bad_arguments(kwargs):
    with pytest.raises(ConfigurationError):
        VGGClassifier(**kwargs)


def test_training_reduces_logistic_loss_and_logs_accuracy(tmp_path):
    pl.seed_everything(0)
    y = torch.arange(128) % 2
    x = 0.5 * torch.rand(128, *MNIST)
    x[y == 1, :, :14] += 0.5  # class 1 has a bright upper half
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    model = MLPClassifier(width=16, lr=0.05)
    trainer = pl.Trainer(
        max_epochs=15,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    before = trainer.validate(model, loader, verbose=False)[0]["val_loss"]
    trainer.fit(model, loader, loader)
    after = trainer.validate(model, loader, verbose=False)[0]
    assert after["val_loss"] < before
    assert 0.0 <= after["val_acc"] <= 1.0
    assert after["val_acc"] > 0.75
