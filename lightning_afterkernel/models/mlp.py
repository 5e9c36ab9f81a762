"""The paper's fully connected network: flatten, ``depth`` x (Linear(width) + ReLU), Linear(-> 1 or k logits)."""

from __future__ import annotations

import math

from torch import nn

from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.models.base import Classifier, InitScheme, check_input_shape, initialise


def mlp_budget_count(input_size: int, width: int, depth: int, num_outputs: int = 1) -> int:
    """The paper code's parameter count for its MLP (it omits the first layer's biases), with a head of
    ``num_outputs`` logits."""
    return input_size * width + (depth - 1) * (width + 1) * width + (width + 1) * num_outputs


def mlp_width_for_budget(
    input_shape: tuple[int, int, int], num_parameters: int, depth: int = 4, num_outputs: int = 1
) -> int:
    """Smallest width whose (paper-code) parameter count, head of ``num_outputs`` logits included, reaches
    ``num_parameters``.

    Matches the author's code with one logit: 94 for MNIST and 32 for CIFAR-10 at the default budget of 1e5.
    """
    input_size = math.prod(input_shape)
    width = 5
    while mlp_budget_count(input_size, width, depth, num_outputs) < num_parameters:
        width += 1
    return width


class MLPClassifier(Classifier):
    """Fully connected ReLU network with one logit (Long 2021, "MLP") or ``num_classes`` logits.

    Args:
        input_shape: (C, H, W) of one image; (1, 28, 28) for MNIST, (3, 32, 32) for CIFAR-10.
        width: hidden width; ``None`` picks the smallest width whose parameter count (the head's included)
            reaches ``num_parameters`` (the paper's rule: 94 on MNIST, 32 on CIFAR-10 for 1e5 and one logit;
            93 on MNIST with 10 logits).
        num_parameters: parameter budget used when ``width`` is None.
        depth: number of hidden layers (4 in the paper).
        lr: SGD learning rate (0.01 in the paper).
        init: ``"glorot"`` (Glorot-uniform weights, zero biases: the paper's Keras default) or ``"torch"``.
        num_classes: 1 (the paper's): one logit, logistic loss; k >= 2: k logits, cross-entropy (see
            :class:`~lightning_afterkernel.models.base.Classifier`).
    """

    afterkernel_stateless_forward = True
    """The forward (``Classifier.forward``: head(body(x))) keeps no state between calls, so the eNTK engine
    may capture chunks side by side on replicas of this class (not of subclasses, which may override it)."""

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        width: int | None = None,
        num_parameters: int = 100_000,
        depth: int = 4,
        lr: float = 0.01,
        init: InitScheme = "glorot",
        num_classes: int = 1,
    ) -> None:
        super().__init__(lr=lr, num_classes=num_classes)
        shape = check_input_shape(input_shape)
        if depth < 1:
            raise ConfigurationError(f"depth={depth} must be >= 1 hidden layer.")
        if width is None:
            if num_parameters < 1:
                raise ConfigurationError(f"num_parameters={num_parameters} must be positive.")
            width = mlp_width_for_budget(shape, num_parameters, depth, num_classes)
        elif width < 1:
            raise ConfigurationError(f"width={width} must be a positive number of hidden units.")
        self.save_hyperparameters()
        self.width = width
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(shape)
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        initialise(self, init)
