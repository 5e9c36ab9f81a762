"""Checkpoints written by earlier versions of the callback still resume."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_afterkernel.callbacks import AfterKernelCallback
from lightning_afterkernel.models import MLPClassifier

DATA = Path(__file__).with_name("data")
OLD_CHECKPOINT = DATA / "af988fc_last.ckpt"


def _maker():
    """The script that wrote the old checkpoint: its data and model are the ones the checkpoint was trained on."""
    spec = importlib.util.spec_from_file_location("make_old_checkpoint", DATA / "make_old_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _old_state() -> dict:
    states = torch.load(OLD_CHECKPOINT, weights_only=False)["callbacks"]
    (state,) = [s for key, s in states.items() if key.startswith("AfterKernelCallback")]
    return state


def test_a_checkpoint_of_main_at_af988fc_resumes_with_its_rows(tmp_path):
    """The checkpoint's side files are gone (it names a deleted folder): its rows are kept as they were, the
    results file is written anew, the later epochs are computed, and alignment_to_initial, which needs the epoch-0
    kernels, is NaN with a warning."""
    maker = _maker()
    ckpt = tmp_path / "old.ckpt"
    shutil.copyfile(OLD_CHECKPOINT, ckpt)
    old_rows = _old_state()["results"]
    assert sorted({r["epoch"] for r in old_rows}) == [0, 1]

    pl.seed_everything(1)
    callback = AfterKernelCallback(
        epochs=[0, 1, 2], n_train=40, n_test=24, n_invariance=8, verbose=False, figures=False, dirpath=str(tmp_path)
    )
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    with pytest.warns(UserWarning) as caught:
        trainer.fit(MLPClassifier(input_shape=maker.SHAPE, width=8, lr=0.1), datamodule=maker.ToyData(), ckpt_path=ckpt)
    messages = [str(w.message) for w in caught]
    assert any("is missing; writing" in m or "is missing; rewriting" in m for m in messages), messages
    assert any("alignment_to_initial" in m and "NaN" in m for m in messages), messages

    assert callback.done_epochs == [0, 1, 2, 3]
    assert json.dumps(callback.results[: len(old_rows)]) == json.dumps(old_rows)  # kept, not recomputed
    new = [r for r in callback.results if r["epoch"] > 1]
    assert [(r["epoch"], r["step"], r["kernel"]) for r in new] == [(e, 6 * e, k) for e in (2, 3) for k in ("ntk", "ck")]
    assert all("error" not in r and math.isfinite(r["kta"]) and math.isfinite(r["network_test_acc"]) for r in new)
    assert all(math.isnan(r["alignment_to_initial"]) for r in new)
    saved = json.loads((tmp_path / "afterkernel_results.json").read_text())["results"]
    assert [(r["epoch"], r["kernel"]) for r in saved] == [(r["epoch"], r["kernel"]) for r in callback.results]


# ---------------------------------------------------------------- self-contained checkpoints
class Run:
    """Fits of the toy task with checkpoints, each in a folder of its own."""

    def __init__(self, tmp_path: Path, validation: bool = False) -> None:
        self.maker = _maker()
        self.tmp_path = tmp_path
        self.validation = validation

    def fit(self, folder: str, max_epochs: int, ckpt: Path | None = None, **options) -> AfterKernelCallback:
        out = self.tmp_path / folder
        pl.seed_everything(0 if ckpt is None else 1)
        settings = {"epochs": [0, 1], "n_train": 40, "n_test": 24, "n_invariance": 8, "verbose": False}
        callback = AfterKernelCallback(**(settings | {"figures": False, "dirpath": str(out / "ak")} | options))
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            callbacks=[callback, ModelCheckpoint(dirpath=out / "ckpt", save_last=True)],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out,
            accelerator="cpu",
        )
        model = MLPClassifier(input_shape=self.maker.SHAPE, width=48, lr=0.1)
        data = WithValidation(self.maker) if self.validation else self.maker.ToyData()
        trainer.fit(model, datamodule=data, ckpt_path=ckpt)
        return callback

    def move(self, folder: str) -> Path:
        """The folder's last checkpoint copied elsewhere, the folder deleted (as when moved to another machine)."""
        moved = self.tmp_path / f"{folder}.ckpt"
        shutil.copyfile(self.tmp_path / folder / "ckpt" / "last.ckpt", moved)
        shutil.rmtree(self.tmp_path / folder)
        return moved


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.endswith("_time_s")}


def test_a_checkpoint_moved_to_a_fresh_folder_recomputes_the_epoch_0_kernels_from_its_own_weights(tmp_path):
    run = Run(tmp_path)
    first = run.fit("first", max_epochs=2, epochs=[0, 1, 3], at_end=False)
    assert first.done_epochs == [0, 1]
    moved = run.move("first")
    assert torch.load(moved, weights_only=False)["callbacks"][first.state_key]["initial_weights"].keys() == set(
        first._record.initial_weights
    )

    with pytest.warns(UserWarning, match="missing; recomputing the epoch-0 .* from the checkpoint's epoch-0 weights"):
        resumed = run.fit("second", max_epochs=3, ckpt=moved, epochs=[0, 1, 3], at_end=False)
    assert resumed.done_epochs == [0, 1, 3]
    assert json.dumps(resumed.results[:4]) == json.dumps(first.results)  # kept as they were
    for name in ("ntk", "ck"):  # the same kernels as the first fit's: the same weights and subsets
        torch.testing.assert_close(resumed._record.initial_kernels[name], first._record.initial_kernels[name])
    late = [r for r in resumed.results if r["epoch"] == 3]
    assert len(late) == 2 and all(0 < r["alignment_to_initial"] < 1 for r in late)
    folder = tmp_path / "second" / "ak"
    assert torch.load(folder / "afterkernel_initial_kernels.pt", weights_only=True).keys() == {"ntk", "ck"}
    state = torch.load(tmp_path / "second" / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert state["initial_kernels_file"] == str(folder / "afterkernel_initial_kernels.pt")
    saved = json.loads((folder / "afterkernel_results.json").read_text())["results"]
    assert [(r["epoch"], r["kernel"]) for r in saved] == [(e, k) for e in (0, 1, 3) for k in ("ntk", "ck")]


class WithValidation(pl.LightningDataModule):
    """The toy task with a validation loader: ModelCheckpoint then saves at validation end, before the epoch-end
    hooks (the configs' case)."""

    def __init__(self, maker) -> None:
        super().__init__()
        self.data = maker.ToyData()
        self.tensors, self.train_dataloader = self.data.tensors, self.data.train_dataloader

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.data.x_test, self.data.y_test), batch_size=16)


@pytest.mark.parametrize("saved_at", ["epoch end", "validation end"])
@pytest.mark.parametrize("max_epochs", [2, 3])
def test_a_finished_fit_resumed_from_its_moved_checkpoint_keeps_every_row(tmp_path, saved_at, max_epochs):
    """The at_end row is computed after the last checkpoint: the checkpoint says its weights end the fit, and a resume
    that cannot find that row (the first run's folder is gone) computes it again on those weights: rows for epoch 0,
    the scheduled epoch, the first fit's end and (to a larger max_epochs) the new end, no NaN alignment."""
    run = Run(tmp_path, validation=saved_at == "validation end")
    first = run.fit("first", max_epochs=2)
    assert first.done_epochs == [0, 1, 2]
    moved = run.move("first")
    assert torch.load(moved, weights_only=False)["callbacks"][first.state_key]["fit_end"] == {"epoch": 2, "step": 12}

    resumed = run.fit("second", max_epochs=max_epochs, ckpt=moved, verbose=True)
    assert resumed.done_epochs == [0, 1, 2, 3][: max_epochs + 1]
    assert [(r["epoch"], r["step"]) for r in resumed.results] == [(e, 6 * e) for e in resumed.done_epochs for _ in "ab"]
    assert json.dumps([_comparable(r) for r in resumed.results[:6]]) == json.dumps(
        [_comparable(r) for r in first.results]
    )  # the first fit's end row computed again on the same weights: the same numbers
    assert all(0 < r["alignment_to_initial"] <= 1 + 1e-9 for r in resumed.results)
    saved = json.loads((tmp_path / "second" / "ak" / "afterkernel_results.json").read_text())["results"]
    assert sorted({r["epoch"] for r in saved}) == resumed.done_epochs
    assert "epoch 2" in resumed.summary_table()


def test_a_fit_resumed_from_a_checkpoint_that_did_not_end_it_adds_no_row(tmp_path):
    run = Run(tmp_path)
    run.fit("first", max_epochs=1, epochs=[0, 1, 2], at_end=False)
    state = torch.load(tmp_path / "first" / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert [s["fit_end"] for key, s in state.items() if key.startswith("AfterKernelCallback")] == [None]
    resumed = run.fit("second", max_epochs=2, ckpt=run.move("first"), epochs=[0, 1, 2])
    assert [(r["epoch"], r["step"]) for r in resumed.results if r["kernel"] == "ntk"] == [(0, 0), (1, 6), (2, 12)]
