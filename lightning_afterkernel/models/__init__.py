"""LightningModules of the paper: a VGG-like convolutional network and a fully connected network (1 or k logits)."""

from lightning_afterkernel.models.base import Classifier, initialise
from lightning_afterkernel.models.mlp import MLPClassifier, mlp_width_for_budget
from lightning_afterkernel.models.vgg import VGGClassifier, vgg_width_for_budget

__all__ = [
    "Classifier",
    "MLPClassifier",
    "VGGClassifier",
    "initialise",
    "mlp_width_for_budget",
    "vgg_width_for_budget",
]
