"""`python -m lightning_afterkernel reproduce --scale tiny` on the real data, resume, then `report`; its data root."""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets

from lightning_afterkernel.__main__ import run
from lightning_afterkernel.data import BinaryPairDataModule
from lightning_afterkernel.reporting import commands

CELLS = ["mnist-mlp-noaug", "mnist-mlp-lr0.1"]


@pytest.mark.real_data
def test_tiny_grid_resumes_and_reports(tmp_path, shared_data, caplog, capsys):
    out = tmp_path / "runs"
    args = ["reproduce", "--out", str(out), "--scale", "tiny", "--data-root", str(shared_data), "--cells", *CELLS]
    run(args)
    files = {name: out / name / "seed0" / "cell.json" for name in CELLS}
    data = {name: json.loads(path.read_text()) for name, path in files.items()}
    for name, d in data.items():
        assert d["complete"] and d["cell"] == name and d["scale"] == "tiny"
        assert 0.0 <= d["network_test_error"] <= 1.0
        for k in ("ntk", "ck"):
            assert d["kernels"][k]["initial"]["epoch"] == 0 and d["kernels"][k]["end"]["epoch"] > 0
        assert set(d["kernels"]["ntk"]["end"]["invariance"]) == {"globalness", "shift", "rotation", "zoom"}
        assert d["alignment_ntk_ck"]["end"] is not None
        assert not (files[name].parent / "checkpoints").exists()  # cleaned once complete
    ref, big = data["mnist-mlp-noaug"], data["mnist-mlp-lr0.1"]
    assert ref["epochs_trained"] == 2 and len(ref["train_loss_per_epoch"]) == 2
    assert big["config"]["lr"] == 0.1 and big["config"]["target_train_loss"] == ref["final_train_loss"]
    # stopped at the first epoch whose mean training loss reached the target, or at the cap
    assert big["reached_target_loss"] == (big["final_train_loss"] <= ref["final_train_loss"])
    assert big["epochs_trained"] <= 3 and big["epochs_trained"] == len(big["train_loss_per_epoch"])

    # resume: complete cells are skipped, not refitted
    mtimes = {name: path.stat().st_mtime_ns for name, path in files.items()}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning_afterkernel.reporting"):
        run(args)
    assert {name: path.stat().st_mtime_ns for name, path in files.items()} == mtimes
    assert sum("skip" in r.getMessage() for r in caplog.records) == 2
    assert not any(r.getMessage().startswith("run ") for r in caplog.records)

    # an incomplete cell file is rerun
    files["mnist-mlp-lr0.1"].write_text(json.dumps({**big, "complete": False}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning_afterkernel.reporting"):
        run(args)
    assert any(r.getMessage().startswith("run mnist-mlp-lr0.1") for r in caplog.records)
    assert json.loads(files["mnist-mlp-lr0.1"].read_text())["complete"] is True

    md = tmp_path / "docs" / "reproduction.md"
    run(["report", str(out), "--out", str(md)])
    text = md.read_text()
    assert "## Claims" in text and "### Claim LR" in text and "| mnist-mlp-lr0.1 | 0.1 |" in text
    assert "Scale: **tiny**" in text
    assert (tmp_path / "docs" / "figures" / "reproduction_svm_error.png").exists()
    assert "wrote" in capsys.readouterr().out


class FakeDownloads:
    """torchvision's MNIST and CIFAR10 downloads, offline: each writes small files in torchvision's layout."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Path, bool]] = []

    def mnist(self, root: str, train: bool = True, download: bool = False) -> None:
        self.calls.append(("mnist", Path(root), train))
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        prefix = "train" if train else "t10k"
        images = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
        labels = (np.arange(40) % 10).astype(np.uint8)
        for name, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (raw / f"{prefix}-{name}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))

    def cifar10(self, root: str, train: bool = True, download: bool = False) -> None:
        self.calls.append(("cifar10", Path(root), train))
        folder = Path(root) / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        data = np.random.default_rng(1).integers(0, 256, size=(20, 3072), dtype=np.uint8)
        for name in [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]:
            (folder / name).write_bytes(pickle.dumps({"data": data, "labels": [i % 10 for i in range(20)]}))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A fresh user cache ($XDG_CACHE_HOME), no $AFTERKERNEL_DATA, fake downloads, and run_grid recorded, not run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("AFTERKERNEL_DATA", raising=False)
    fake = FakeDownloads()
    monkeypatch.setattr(torchvision.datasets, "MNIST", fake.mnist)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake.cifar10)
    grids: list[str | None] = []
    monkeypatch.setattr(commands, "run_grid", lambda out, scale, seeds, data_root, *rest: grids.append(data_root) or [])
    return fake, grids, tmp_path / "xdg" / "lightning_afterkernel"


def test_default_data_root_is_the_data_modules_cache_downloaded_once(offline, tmp_path):
    fake, grids, cache = offline
    run(["reproduce", "--out", str(tmp_path / "runs"), "--scale", "tiny", "--cells", "mnist-mlp-noaug"])
    assert grids == [str(cache)]
    assert fake.calls == [("mnist", cache, True), ("mnist", cache, False)]  # only what the cells read
    dm = BinaryPairDataModule(root=grids[0])  # as the grid reads it: without download
    assert dm.root == grids[0] and len(dm.tensors("train")[1]) == 8  # the fake split's threes and eights

    run(["reproduce", "--out", str(tmp_path / "runs"), "--scale", "tiny"])  # every cell: CIFAR-10 too
    assert grids[-1] == str(cache)
    assert fake.calls[2:] == [("cifar10", cache, True), ("cifar10", cache, False)]  # MNIST is there already


@pytest.mark.parametrize("source", ["option", "environment"])
def test_a_given_data_root_is_read_without_download(offline, tmp_path, monkeypatch, source):
    fake, grids, cache = offline
    given = str(tmp_path / "offline_data")
    args = ["reproduce", "--out", str(tmp_path / "runs"), "--scale", "tiny"]
    if source == "option":
        run([*args, "--data-root", given])
    else:
        monkeypatch.setenv("AFTERKERNEL_DATA", given)
        run(args)
    assert grids == [given]
    assert fake.calls == [] and not cache.exists()


def test_a_scale_on_whole_splits_evaluates_every_image_and_the_evidence_epochs(tmp_path):
    """n_train/n_test None: the kernel SVMs take every training and test image; the lr 0.01 no-augmentation cells
    also evaluate the evidence epochs (bundled MNIST 3-vs-8, no real data needed)."""
    from lightning_afterkernel.reporting.grid import Cell, Scale, run_one

    scale = Scale("whole", 120, 60, None, None, 4, 3, 1, 0.1, 2, 1, evidence_epochs=(2, 5))
    payload = run_one(Cell("mnist", "mlp"), 0, scale, tmp_path, None)
    rows = payload["rows"]
    assert sorted({r["epoch"] for r in rows}) == [0, 1, 2, 3]  # evidence epoch 5 is past max_epochs
    assert (payload["config"]["n_train"], payload["config"]["n_test"]) == (120, 60)
    augmented = run_one(Cell("mnist", "mlp", augment=True), 0, scale, tmp_path, None)
    assert sorted({r["epoch"] for r in augmented["rows"]}) == [0, 1, 3]
