"""Shared LightningModule of the classifiers: one logit (the paper's binary setup) or k logits."""

from __future__ import annotations

from typing import Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from lightning_afterkernel.errors import ConfigurationError

InitScheme = Literal["glorot", "torch"]


def initialise(module: nn.Module, scheme: InitScheme) -> None:
    """Initialise every Linear/Conv2d of ``module``.

    ``"glorot"``: Glorot-uniform weights and zero biases (the Keras default the paper used; for a
    convolution the fans are ``k*k*C_in`` and ``k*k*C_out``, as in Keras). ``"torch"``: PyTorch's own
    default (Kaiming-uniform with a=sqrt(5)), left as constructed.
    """
    if scheme == "torch":
        return
    if scheme != "glorot":
        raise ConfigurationError(f"init={scheme!r} is not known; use 'glorot' (the paper's) or 'torch'.")
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def check_input_shape(input_shape: tuple[int, ...] | list[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigurationError(
            f"input_shape={input_shape!r} must be (channels, height, width) with positive entries, "
            "e.g. (1, 28, 28) for MNIST or (3, 32, 32) for CIFAR-10."
        )
    return shape  # type: ignore[return-value]


def check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigurationError(
            f"num_classes={num_classes!r} must be a positive integer: 1 for one logit with the logistic loss "
            "(a binary task, as in the paper), k >= 2 for k logits with cross-entropy."
        )
    return num_classes


class Classifier(pl.LightningModule):
    """A classifier trained as in Long (2021): plain SGD (no momentum, no weight decay).

    ``num_classes=1`` (the paper's setting): one logit per example, ``forward`` returns (n,), logistic loss
    (labels in {0, 1}), binary accuracy. ``num_classes=k >= 2``: k logits, ``forward`` returns (n, k),
    cross-entropy (labels 0..k-1), multiclass accuracy. Accuracy is logged on train/val/test. Subclasses build
    ``self.body`` (input -> penultimate features) and ``self.head`` (features -> ``num_classes`` logits).
    """

    body: nn.Module
    head: nn.Linear

    def __init__(self, lr: float = 0.01, num_classes: int = 1) -> None:
        super().__init__()
        if not lr > 0:
            raise ConfigurationError(f"lr={lr!r} must be a positive learning rate (the paper uses 0.01).")
        self.lr = lr
        self.num_classes = check_num_classes(num_classes)
        if num_classes == 1:
            self.train_acc, self.val_acc, self.test_acc = BinaryAccuracy(), BinaryAccuracy(), BinaryAccuracy()
        else:
            self.train_acc, self.val_acc, self.test_acc = (
                MulticlassAccuracy(num_classes, average="micro") for _ in range(3)
            )

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (n, d): the representation whose Gram matrix is the conjugate kernel."""
        return self.body(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """The logits: shape (n,) with ``num_classes=1``, (n, k) with ``num_classes=k >= 2``."""
        logits = self.head(self.features(x))
        return logits.squeeze(-1) if self.num_classes == 1 else logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def setup(self, stage: str) -> None:
        """Refuse a datamodule whose number of classes the head does not fit (one logit serves two classes)."""
        k = getattr(self.trainer.datamodule, "num_classes", None)
        if isinstance(k, int) and k != max(self.num_classes, 2):
            raise ConfigurationError(
                f"the datamodule has {k} classes but the model was built with num_classes={self.num_classes} "
                f"({'one logit, for two classes' if self.num_classes == 1 else f'{self.num_classes} logits'}); "
                f"build it with num_classes={1 if k == 2 else k}"
                + (" (or 2 for two logits with cross-entropy)" if k == 2 else "")
            )

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, metric: Metric) -> Tensor:
        x, y = batch
        logits = self(x)
        if self.num_classes == 1:
            loss = F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
            # Probabilities, not logits: torchmetrics only applies a sigmoid when some value is outside [0, 1].
            metric(torch.sigmoid(logits.detach()), y.long())
        else:
            loss = F.cross_entropy(logits, y.long())
            metric(logits.detach(), y.long())
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train", on_step=False, on_epoch=True)
        self.log(f"{stage}_acc", metric, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.0, weight_decay=0.0)
