"""Shared LightningModule for binary classifiers with one scalar logit (the paper's training setup)."""

from __future__ import annotations

from typing import Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import BinaryAccuracy

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


class BinaryClassifier(pl.LightningModule):
    """A network with one logit per example, trained as in Long (2021).

    Logistic loss on the scalar logit (labels in {0, 1}), plain SGD (no momentum, no weight decay),
    binary accuracy on train/val/test. Subclasses build ``self.body`` (input -> penultimate features)
    and ``self.head`` (features -> one logit).
    """

    body: nn.Module
    head: nn.Linear

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        if not lr > 0:
            raise ConfigurationError(f"lr={lr!r} must be a positive learning rate (the paper uses 0.01).")
        self.lr = lr
        self.train_acc = BinaryAccuracy()
        self.val_acc = BinaryAccuracy()
        self.test_acc = BinaryAccuracy()

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (n, d): the representation whose Gram matrix is the conjugate kernel."""
        return self.body(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """One logit per example, shape (n,)."""
        return self.head(self.features(x)).squeeze(-1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, metric: BinaryAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
        # Probabilities, not logits: torchmetrics only applies a sigmoid when some value is outside [0, 1].
        metric(torch.sigmoid(logits.detach()), y.long())
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
