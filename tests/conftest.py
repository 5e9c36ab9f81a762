"""Shared fixtures: real-data location, isolated W&B/matplotlib state, CUDA and data skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_root() -> Path | None:
    """The folder holding the real MNIST/CIFAR-10 files, or None when absent.

    ``AFTERKERNEL_DATA`` names it explicitly; otherwise ``../shared/data`` from the project root.
    """
    candidates = [os.environ.get("AFTERKERNEL_DATA"), REPO_ROOT.parent / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "mnist" / "MNIST" / "raw").is_dir():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip("real data not found: set AFTERKERNEL_DATA or provide ../shared/data")
    return root


@pytest.fixture(scope="session")
def real_mnist(shared_data):
    """The real MNIST 3-vs-8 (train, test) images as the data module gives them (strides of channels-last)."""
    from lightning_afterkernel.data import BinaryPairDataModule

    dm = BinaryPairDataModule(dataset="mnist", root=str(shared_data))
    dm.setup("fit")
    return dm.tensors("train")[0], dm.tensors("test")[0]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Keep wandb and matplotlib away from ~/.cache and the network in every test."""
    base = tmp_path_factory.getbasetemp()
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(base / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MPLCONFIGDIR", str(base / "mpl"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
