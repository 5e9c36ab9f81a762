"""Paper architectures: exact parameter counts, shapes, initialisation, training behaviour, errors; 1 or k logits."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_afterkernel.data import ImageClassDataModule
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


# --- num_classes: one logit (the paper's, unchanged) or k logits --------------------------------------------------


def reference_mlp(shape: tuple[int, int, int], width: int) -> nn.Sequential:
    """The paper's MLP written out layer by layer, Glorot-initialised in construction order (as the model is)."""
    sizes = [math.prod(shape)] + [width] * 4
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(sizes, sizes[1:], strict=False):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return glorot(nn.Sequential(*layers, nn.Linear(width, 1)))


def reference_vgg(shape: tuple[int, int, int], width: int) -> nn.Sequential:
    c, side = shape[0], shape[1]
    layers: list[nn.Module] = []
    for out in (width, 2 * width):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.Conv2d(out, out, 3, padding=1), nn.ReLU()]
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
        c, side = out, math.ceil(side / 2)
    return glorot(nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * side * side, 1)))


def glorot(net: nn.Sequential) -> nn.Sequential:
    for m in net:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return net


@pytest.mark.parametrize(
    ("cls", "reference", "width"), [(MLPClassifier, reference_mlp, 94), (VGGClassifier, reference_vgg, 38)]
)
def test_one_logit_is_the_paper_network_and_training_step(cls, reference, width, tmp_path):
    """num_classes=1: today's width, parameters (same init, same order) and first SGD step of the logistic loss."""
    torch.manual_seed(0)
    model = cls(input_shape=MNIST, num_classes=1)
    torch.manual_seed(0)
    ref = reference(MNIST, width)
    assert model.width == width
    assert [p.shape for p in model.parameters()] == [p.shape for p in ref.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True))

    x = torch.rand(32, *MNIST, generator=torch.Generator().manual_seed(1))
    y = torch.arange(32) % 2
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    ref_loss = nn.functional.binary_cross_entropy_with_logits(ref(x).squeeze(-1), y.float())
    ref_loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.01 * p.grad
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(ref_loss.item(), rel=1e-6)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", [MLPClassifier, VGGClassifier])
@pytest.mark.parametrize("shape", [MNIST, CIFAR])
def test_ten_logits_shapes(cls, shape):
    model = cls(input_shape=shape, num_classes=10)
    x = torch.rand(5, *shape)
    assert model(x).shape == (5, 10)
    assert model.head.out_features == 10
    torch.testing.assert_close(model(x), model.head(model.features(x)))


def test_mlp_width_for_ten_logits_counts_the_head():
    """The smallest width whose paper-code count, with a 10-logit head, reaches 1e5 (written out independently)."""

    def count(w: int) -> int:  # first layer without biases (the paper code's rule), 3 hidden, head of 10 logits
        return 784 * w + 3 * (w + 1) * w + 10 * (w + 1)

    model = MLPClassifier(input_shape=MNIST, num_classes=10)
    assert count(model.width) >= 100_000 > count(model.width - 1)
    assert model.width < MLPClassifier(input_shape=MNIST).width  # the larger head leaves fewer hidden units
    assert model.num_parameters() == count(model.width) + model.width


@pytest.mark.parametrize("shape", [MNIST, CIFAR])
def test_vgg_width_for_ten_logits_counts_the_head(shape):
    from lightning_afterkernel.models.vgg import vgg_budget_count

    one, ten = VGGClassifier(input_shape=shape), VGGClassifier(input_shape=shape, num_classes=10)

    def budget(width: int, k: int) -> float:
        return vgg_budget_count(shape, width, 2, 2, 3, 2, k)

    # the paper code's head term (fractional field side/4, 2 * width channels, one bias) once per logit
    head = (shape[1] / 4) ** 2 * 2 * ten.width + 1
    assert budget(ten.width, 10) == pytest.approx(budget(ten.width, 1) + 9 * head)
    assert budget(ten.width, 10) >= 100_000 > budget(ten.width - 1, 10)
    assert ten.width < one.width
    assert ten.head.in_features == 2 * ten.width * math.ceil(shape[1] / 4) ** 2
    assert 90_000 <= ten.num_parameters() <= 102_000


def test_multiclass_training_uses_cross_entropy_and_multiclass_accuracy(tmp_path):
    pl.seed_everything(0)
    y = torch.arange(150) % 3
    x = 0.3 * torch.rand(150, *MNIST)
    for c in range(3):  # class c has a bright band of rows
        x[y == c, :, 9 * c : 9 * c + 9] += 0.7
    loader = DataLoader(TensorDataset(x, y), batch_size=30)
    model = MLPClassifier(width=16, lr=0.1, num_classes=3)
    assert isinstance(model.train_acc, MulticlassAccuracy) and model.train_acc.num_classes == 3
    trainer = pl.Trainer(
        max_epochs=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x), y)
    first = trainer.validate(model, loader, verbose=False)[0]
    assert first["val_loss"] == pytest.approx(float(expected), rel=1e-5)
    trainer.fit(model, loader, loader)
    after = trainer.validate(model, loader, verbose=False)[0]
    assert after["val_loss"] < first["val_loss"]
    with torch.no_grad():
        argmax_acc = float((model(x).argmax(1) == y).float().mean())
    assert after["val_acc"] == pytest.approx(argmax_acc)
    assert after["val_acc"] > 0.9


@pytest.mark.parametrize("num_classes", [0, -2, True, 2.5, "10"])
def test_bad_num_classes(num_classes):
    with pytest.raises(ConfigurationError, match="num_classes"):
        MLPClassifier(width=8, num_classes=num_classes)


@pytest.mark.parametrize(("num_classes", "fits"), [(1, True), (2, True), (10, False)])
def test_fit_refuses_a_datamodule_with_another_number_of_classes(num_classes, fits, tmp_path):
    dm = ImageClassDataModule(classes=[3, 8], train_subset=64, test_subset=32)  # bundled MNIST: two classes
    model = MLPClassifier(width=8, num_classes=num_classes)
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        limit_val_batches=1,
    )
    if fits:
        trainer.fit(model, datamodule=dm)
        assert trainer.global_step == 1
    else:
        with pytest.raises(ConfigurationError, match=r"2 classes .*num_classes=10.*num_classes=1"):
            trainer.fit(model, datamodule=dm)


@pytest.mark.real_data
def test_ten_class_mlp_learns_mnist(shared_data, tmp_path):
    """A short real fit: the 10-class MLP (budget width) on 2,000 MNIST training images, 5 epochs at lr 0.1."""
    pl.seed_everything(0)
    dm = ImageClassDataModule(root=str(shared_data), train_subset=2000, test_subset=500)
    model = MLPClassifier(input_shape=dm.input_shape, num_classes=dm.num_classes, lr=0.1)
    trainer = pl.Trainer(
        max_epochs=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert metrics["val_acc"] > 0.8  # chance is 0.1
