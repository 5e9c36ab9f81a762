"""The paper's VGG-like network: blocks of 3x3 "same" convolutions + ReLU, max-pool, then Linear(-> 1 or k logits)."""

from __future__ import annotations

import math

from torch import nn

from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.models.base import Classifier, InitScheme, check_input_shape, initialise


def vgg_budget_count(
    input_shape: tuple[int, int, int],
    width: int,
    num_blocks: int,
    layers_per_block: int,
    kernel_size: int,
    pool_size: int,
    num_outputs: int = 1,
) -> float:
    """The paper code's approximate VGG parameter count with a head of ``num_outputs`` logits, used only to choose
    the width.

    It counts ``C_in * C_out * (1 + k^2)`` per convolution (so biases are over-counted) and a
    fractional spatial size after pooling; it is reproduced so that the default width matches the
    paper (38 channels on MNIST, 37 on CIFAR-10). The exact count is ``model.num_parameters()``.
    """
    channels, side, _ = input_shape[0], input_shape[1], input_shape[2]
    count = 0.0
    field = float(side)
    for b in range(num_blocks):
        new = width if b == 0 else 2 * channels
        count += channels * new * (1 + kernel_size**2)
        channels = new
        count += (layers_per_block - 1) * channels * channels * (1 + kernel_size**2)
        field /= pool_size
    return count + field * field * channels * num_outputs + num_outputs


def vgg_width_for_budget(
    input_shape: tuple[int, int, int],
    num_parameters: int,
    num_blocks: int = 2,
    layers_per_block: int = 2,
    kernel_size: int = 3,
    pool_size: int = 2,
    num_outputs: int = 1,
) -> int:
    """Smallest first-block channel count whose (paper-code) parameter count, head of ``num_outputs`` logits
    included, reaches the budget."""
    width = 4
    shape = (num_blocks, layers_per_block, kernel_size, pool_size)
    while vgg_budget_count(input_shape, width, *shape, num_outputs) < num_parameters:
        width += 1
    return width


class VGGClassifier(Classifier):
    """VGG-style convolutional network with one logit (Long 2021, "VGG") or ``num_classes`` logits.

    ``num_blocks`` blocks of ``layers_per_block`` x (Conv2d k x k, "same" padding, + ReLU), each
    followed by a ``pool_size`` max-pool ("same" padding, i.e. ``ceil_mode``); channels double per
    block; then flatten and Linear(-> ``num_classes`` logits). The penultimate features are the flattened last max-pool.

    Args:
        input_shape: (C, H, W) of one image; (1, 28, 28) for MNIST, (3, 32, 32) for CIFAR-10.
        width: channels of the first block; ``None`` picks it from ``num_parameters`` with the paper
            code's rule, the head's parameters included (one logit: 38 on MNIST, 95,267 parameters; 37 on
            CIFAR-10, 92,205 parameters).
        num_parameters: parameter budget used when ``width`` is None.
        lr: SGD learning rate (0.01 in the paper).
        init: ``"glorot"`` (the paper's Keras default) or ``"torch"``.
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
        num_blocks: int = 2,
        layers_per_block: int = 2,
        kernel_size: int = 3,
        pool_size: int = 2,
        lr: float = 0.01,
        init: InitScheme = "glorot",
        num_classes: int = 1,
    ) -> None:
        super().__init__(lr=lr, num_classes=num_classes)
        shape = check_input_shape(input_shape)
        if num_blocks < 1 or layers_per_block < 1 or pool_size < 1:
            raise ConfigurationError(
                f"num_blocks={num_blocks}, layers_per_block={layers_per_block} and pool_size={pool_size} "
                "must all be >= 1."
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigurationError(f"kernel_size={kernel_size} must be odd for 'same' padding (e.g. 3).")
        if width is None:
            if num_parameters < 1:
                raise ConfigurationError(f"num_parameters={num_parameters} must be positive.")
            width = vgg_width_for_budget(
                shape, num_parameters, num_blocks, layers_per_block, kernel_size, pool_size, num_classes
            )
        elif width < 1:
            raise ConfigurationError(f"width={width} must be a positive number of channels.")
        self.save_hyperparameters()
        self.width = width
        layers: list[nn.Module] = []
        channels, side = shape[0], (shape[1], shape[2])
        out = width
        for _ in range(num_blocks):
            for _ in range(layers_per_block):
                layers += [nn.Conv2d(channels, out, kernel_size, padding=kernel_size // 2), nn.ReLU()]
                channels = out
            layers.append(nn.MaxPool2d(pool_size, ceil_mode=True))
            side = (math.ceil(side[0] / pool_size), math.ceil(side[1] / pool_size))
            out = 2 * channels
        layers.append(nn.Flatten())
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels * side[0] * side[1], num_classes)
        initialise(self, init)
