"""LightningModules of the paper: a VGG-like convolutional network and a fully connected network."""

from lightning_afterkernel.models.base import BinaryClassifier, initialise
from lightning_afterkernel.models.mlp import MLPClassifier, mlp_width_for_budget
from lightning_afterkernel.models.vgg import VGGClassifier, vgg_width_for_budget

__all__ = [
    "BinaryClassifier",
    "MLPClassifier",
    "VGGClassifier",
    "initialise",
    "mlp_width_for_budget",
    "vgg_width_for_budget",
]
