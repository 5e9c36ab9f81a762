"""AfterKernelCallback in real Trainers: schedule, logging, state, resume, and every error path."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers.logger import Logger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_afterkernel._io import finite_or_none
from lightning_afterkernel.callbacks import AfterKernelCallback, _figures, evaluation
from lightning_afterkernel.errors import ConfigurationError, DataError, KernelError, ModelError
from lightning_afterkernel.kernels import conjugate_kernel, empirical_ntk, empirical_ntk_train_test
from lightning_afterkernel.models import MLPClassifier, VGGClassifier
from lightning_afterkernel.svm import HardMarginSVM

SHAPE = (1, 8, 8)


def toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.6 * torch.rand(n, *SHAPE, generator=g)
    x[y == 1, :, :4] += 0.4
    return x, y


class ToyData(pl.LightningDataModule):
    def __init__(self, n_train: int = 96, n_test: int = 48, flip_duplicates: bool = False) -> None:
        super().__init__()
        self.x_train, self.y_train = toy_data(n_train, 0)
        self.x_test, self.y_test = toy_data(n_test, 1)
        if flip_duplicates:  # the same image twice with opposite labels: no hard margin exists
            self.x_train[1] = self.x_train[0]
            self.y_train[1] = 1 - self.y_train[0]

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=16)


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def values(self, key: str) -> list[float]:
        return [m[key] for _, m in self.rows if key in m]


class PlainLogit(pl.LightningModule):
    """A user's own module: one logit, no `features` method."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), y.float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_trainer(tmp_path, callbacks, max_epochs=2, logger=None, accelerator="cpu", **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator=accelerator,
        **kwargs,
    )


def wide_mlp(**kwargs) -> MLPClassifier:
    """Width 64 > n_train = 40: generic CK features of 40 images span them, so the CK is separable."""
    return MLPClassifier(input_shape=SHAPE, width=64, **kwargs)


def small_callback(**kwargs) -> AfterKernelCallback:
    options = {"epochs": [0, 1], "n_train": 40, "n_test": 24, "verbose": False, "figures": False}
    options.update(kwargs)
    return AfterKernelCallback(**options)


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": [0, 3, 2]}, "strictly increasing"),
        ({"epochs": [0, 0]}, "strictly increasing"),
        ({"epochs": [-1]}, "non-negative"),
        ({"kernels": ["ntk", "rbf"]}, "kernels"),
        ({"kernels": []}, "kernels"),
        ({"n_train": 1}, "n_train"),
        ({"n_test": 0}, "n_test"),
        ({"epochs": [], "at_end": False}, "Nothing to compute"),
        ({"dtype": "float16"}, "dtype"),
        ({"svm": {"no_such_option": 1}}, "svm"),
        ({"implementation": "fastest"}, "implementation='fastest' must be one of"),
        ({"memory_budget": "a lot"}, "memory_budget='a lot'"),
        ({"name": "my run/1"}, "name='my run/1' must be None or a short name"),
        ({"name": ""}, "name='' must be"),
        ({"invariance_images": "val"}, "invariance_images='val' must be 'test'"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        AfterKernelCallback(**kwargs)


# ---------------------------------------------------------------- end to end
def test_schedule_logging_results_file_and_summary(tmp_path, capsys):
    pl.seed_everything(0)
    logger = MemoryLogger()
    cb = small_callback(verbose=True, dirpath=str(tmp_path / "out"))
    model = wide_mlp(lr=0.1)
    trainer = make_trainer(tmp_path, [cb], max_epochs=3, logger=logger)
    trainer.fit(model, datamodule=ToyData())

    assert cb.done_epochs == [0, 1, 3]  # 0 = initial, 1 scheduled, 3 = end of training
    assert {(r["epoch"], r["kernel"]) for r in cb.results} == {(e, k) for e in (0, 1, 3) for k in ("ntk", "ck")}
    for r in cb.results:
        assert r["svm_separable"] == 1
        assert 0.5 < r["svm_test_acc"] <= 1.0
        assert r["svm_min_margin"] > 0.99
        assert 0 < r["svm_n_support"] <= 40
        assert 0 < r["alignment_ntk_ck"] <= 1
        assert 0 < r["alignment_to_initial"] <= 1 + 1e-9
    assert [r["alignment_to_initial"] for r in cb.results if r["epoch"] == 0] == pytest.approx([1.0, 1.0])

    assert logger.values("afterkernel/epoch") == [0.0, 1.0, 3.0]
    for k in ("ntk", "ck"):
        assert len(logger.values(f"afterkernel/{k}/svm_test_acc")) == 3
    assert len(logger.values("afterkernel/alignment_ntk_ck")) == 3
    steps = [s for s, m in logger.rows if "afterkernel/epoch" in m]
    assert steps == [0, 6, 18]  # 96 examples / 16 per batch = 6 steps per epoch

    saved = json.loads((tmp_path / "out" / "afterkernel_results.json").read_text())
    assert saved["n_train"] == 40 and len(saved["results"]) == 6
    out = capsys.readouterr().out
    assert "After-kernel summary" in out and "NTK SVM" in out and "CK SVM" in out and "network itself" in out


@pytest.mark.gpu
def test_a_gpu_trainer_computes_the_kernels_on_the_card(tmp_path, monkeypatch):
    """On a GPU Trainer the kernels are computed on the card; the initial kernels (the same weights on both
    devices) give the CPU run's SVM results."""
    seen = []
    original = empirical_ntk_train_test

    def spy(model, x_train, x_test, **kwargs):
        seen.append((next(model.parameters()).device.type, str(kwargs["device"])))
        return original(model, x_train, x_test, **kwargs)

    monkeypatch.setattr(evaluation, "empirical_ntk_train_test", spy)
    runs = {}
    for accelerator in ("gpu", "cpu"):
        pl.seed_everything(0)
        cb = small_callback(n_invariance=8)
        trainer = make_trainer(tmp_path / accelerator, [cb], max_epochs=1, accelerator=accelerator)
        trainer.fit(wide_mlp(lr=0.1), datamodule=ToyData())
        runs[accelerator] = cb.results
    assert seen[:2] == [("cuda", "cuda:0")] * 2 and seen[2:] == [("cpu", "cpu")] * 2  # epochs 0 and 1 each
    for r in runs["gpu"]:
        assert r["svm_separable"] == 1 and r["svm_min_margin"] > 0.99 and 0.5 < r["svm_test_acc"] <= 1.0
        assert all(math.isfinite(r[f"invariance_{f}"]) for f in ("globalness", "shift", "rotation", "zoom"))

    def initial(run: list[dict], keys: tuple[str, ...]) -> list[tuple]:
        return [tuple(r[k] for k in keys) for r in run if r["epoch"] == 0]

    keys = ("kernel", "svm_test_acc", "svm_n_support")
    assert initial(runs["gpu"], keys) == initial(runs["cpu"], keys)
    numbers = ("alignment_ntk_ck", "invariance_shift", "invariance_globalness")
    for gpu, cpu in zip(initial(runs["gpu"], numbers), initial(runs["cpu"], numbers), strict=True):
        assert gpu == pytest.approx(cpu, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("svm", [{}, {"device": "cuda"}])
def test_an_analysis_that_runs_out_of_gpu_memory_is_done_on_the_cpu(tmp_path, monkeypatch, svm):
    """The SVM and metrics run on the card; when it has no room for them (simulated) they are redone on the CPU,
    with a warning, and give the same rows: training does not crash for the callback's memory use. The retry
    keeps the SVM on the CPU even when svm={"device": "cuda"} asks for the card."""
    real_fit = HardMarginSVM.fit

    def no_room_on_the_card(self, K, y):
        if (isinstance(K, torch.Tensor) and K.is_cuda) or str(self.device).startswith("cuda"):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_fit(self, K, y)

    runs = {}
    for full in (False, True):
        if full:
            monkeypatch.setattr(HardMarginSVM, "fit", no_room_on_the_card)
        pl.seed_everything(0)
        cb = small_callback(epochs=[0], at_end=False, n_invariance=0, svm=svm)
        trainer = make_trainer(tmp_path / str(full), [cb], max_epochs=1, accelerator="gpu")
        if full:
            with pytest.warns(UserWarning, match="ran out of GPU memory .*doing them on the CPU"):
                trainer.fit(wide_mlp(), datamodule=ToyData())
        else:
            trainer.fit(wide_mlp(), datamodule=ToyData())
        runs[full] = cb.results
    keys = ("svm_test_acc", "svm_n_support", "kta", "effective_rank", "alignment_ntk_ck")
    for ours, theirs in zip(runs[True], runs[False], strict=True):
        assert "error" not in ours
        assert [ours[k] for k in keys] == pytest.approx([theirs[k] for k in keys], rel=1e-6)


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_kernel_progress_sits_beside_lightnings_progress_bar(tmp_path, capsys, monkeypatch, bar):
    from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

    from lightning_afterkernel.kernels import empirical

    monkeypatch.setattr(empirical, "TILE", 8)  # 40 train + 24 test examples: 5 x 3 tiles, 15 + 15 computed
    progress_bar = TQDMProgressBar() if bar == "tqdm" else RichProgressBar()
    updates = []
    if bar == "rich":
        original = RichProgressBar._init_progress

        def spy(self, trainer):
            original(self, trainer)
            add_task = self.progress.add_task
            self.progress.add_task = lambda label, **kw: updates.append(label) or add_task(label, **kw)

        monkeypatch.setattr(RichProgressBar, "_init_progress", spy)
    cb = small_callback(epochs=[0], at_end=False, kernels=["ntk"])
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[cb, progress_bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(wide_mlp(), datamodule=ToyData())
    if bar == "tqdm":
        assert "after kernel: NTK" in capsys.readouterr().out
    else:
        assert "after kernel: NTK" in updates
        assert all(task.description != "after kernel: NTK" for task in progress_bar.progress.tasks)  # removed
    assert len(cb.results) == 1


@pytest.mark.parametrize("implementation", ["structured", "vmap"])
def test_implementation_and_memory_budget_reach_the_engine(tmp_path, implementation):
    pl.seed_everything(0)
    cb = small_callback(epochs=[0], at_end=False, kernels=["ntk"], implementation=implementation, memory_budget="2MB")
    model = wide_mlp()
    initial = copy.deepcopy(model)
    make_trainer(tmp_path, [cb], max_epochs=1).fit(model, datamodule=ToyData())
    x_tr = ToyData().x_train[cb._record.indices["train"]]
    y_tr = ToyData().y_train[cb._record.indices["train"]]
    expected = HardMarginSVM().fit(empirical_ntk(initial, x_tr).double(), y_tr)
    assert cb.results[0]["svm_n_support"] == expected.n_support_


def test_max_steps_mid_epoch_is_labelled_by_the_training_really_done(tmp_path):
    """Lightning calls on_train_epoch_end for an epoch that max_steps cut short; it is not a full epoch."""
    cb = small_callback(epochs=[0, 2], at_end=True)
    trainer = make_trainer(tmp_path, [cb], max_epochs=5, max_steps=8)  # 6 batches per epoch: 1 + 2/6 epochs
    trainer.fit(wide_mlp(), datamodule=ToyData())
    assert trainer.global_step == 8
    assert cb.done_epochs == [0, 1.333]
    assert [r["step"] for r in cb.results if r["kernel"] == "ntk"] == [0, 8]


def test_logged_accuracy_matches_an_independent_computation(tmp_path):
    """The epoch-0 row equals kernels + SVM recomputed by hand on the same subsets."""
    pl.seed_everything(0)
    cb = small_callback(epochs=[0], at_end=False)
    model = wide_mlp()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    dm = ToyData()
    make_trainer(tmp_path, [cb], max_epochs=1).fit(model, datamodule=dm)

    model.load_state_dict(initial)
    idx_tr, idx_te = cb._record.indices["train"], cb._record.indices["test"]
    x_tr, y_tr = dm.x_train[idx_tr], dm.y_train[idx_tr]
    x_te, y_te = dm.x_test[idx_te], dm.y_test[idx_te]
    for name, fn in (("ntk", empirical_ntk), ("ck", conjugate_kernel)):
        svm = HardMarginSVM().fit(fn(model, x_tr).double(), y_tr)
        row = next(r for r in cb.results if r["kernel"] == name)
        assert row["svm_test_acc"] == pytest.approx(svm.score(fn(model, x_te, x_tr).double(), y_te))
        assert row["svm_n_support"] == svm.n_support_


def test_training_is_unaffected_and_model_mode_restored(tmp_path):
    class ModeSpy(pl.Callback):
        modes: list[bool] = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.modes.append(pl_module.training)

    def run(callbacks):
        pl.seed_everything(0)
        model = VGGClassifier(input_shape=SHAPE, width=2, lr=0.1)
        make_trainer(tmp_path, callbacks, max_epochs=2).fit(model, datamodule=ToyData())
        return model.state_dict()

    spy = ModeSpy()
    with_cb = run([small_callback(), spy])
    without = run([])
    assert spy.modes == [True, True]  # the callback ran first at epoch ends and left train mode on
    for key in without:
        torch.testing.assert_close(with_cb[key], without[key], rtol=0, atol=0)


def test_user_module_without_features_skips_ck_with_message(tmp_path):
    cb = small_callback()
    with pytest.warns(UserWarning, match="conjugate kernel is skipped.*features"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(PlainLogit(), datamodule=ToyData())
    assert {r["kernel"] for r in cb.results} == {"ntk"}
    assert cb.done_epochs == [0, 1]


def test_ck_only_without_features_is_an_error(tmp_path):
    cb = small_callback(kernels=["ck"])
    with pytest.raises(ConfigurationError, match="features"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(PlainLogit(), datamodule=ToyData())


def test_plain_dataloaders_without_datamodule(tmp_path):
    x, y = toy_data(64, 0)
    xv, yv = toy_data(32, 1)
    cb = small_callback(epochs=[0], at_end=True, n_train=30, n_test=20)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(
        wide_mlp(),
        DataLoader(TensorDataset(x, y), batch_size=16),
        DataLoader(TensorDataset(xv, yv), batch_size=16),
    )
    assert cb.done_epochs == [0, 1]


def test_subset_larger_than_data_is_an_error_at_setup(tmp_path):
    cb = small_callback(n_train=500)
    with pytest.raises(ConfigurationError, match="n_train=500 is larger than the 96 train examples"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(MLPClassifier(input_shape=SHAPE, width=8), datamodule=ToyData())
    assert cb.results == []


def test_one_class_training_subset_is_an_error(tmp_path):
    dm = ToyData()
    dm.y_train = torch.zeros_like(dm.y_train)
    with pytest.raises(DataError, match="two"):
        make_trainer(tmp_path, [small_callback()], max_epochs=1).fit(
            MLPClassifier(input_shape=SHAPE, width=8), datamodule=dm
        )


class ManyLogits(PlainLogit):
    """A softmax-style classifier: ``shape`` outputs per example, with penultimate features (so the CK applies)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        self.net[-1] = nn.Linear(8, math.prod(shape))

    def forward(self, x):
        return self.net(x).reshape(len(x), *self.shape)

    def features(self, x):
        return self.net[:-1](x)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).square().mean()


class Steps(pl.Callback):
    """Counts the training batches that started."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args) -> None:
        self.batches += 1


@pytest.mark.parametrize(
    ("kernels", "shape"), [(["ntk"], (2, 3)), (["ck"], (2, 1)), (["ntk", "ck"], (2, 3)), (["ntk", "ck"], (1, 1, 1))]
)
def test_an_output_the_kernels_cannot_use_is_refused_before_any_training_step(tmp_path, kernels, shape):
    """With epochs=[1] nothing would be computed before a whole epoch has trained: the model is checked at fit start,
    for every kernel choice (kernels=['ck'] used to fail with a bare RuntimeError from the network-accuracy line).
    (n,), (n, 1) and (n, k) are logits (test_multiclass.py); more dimensions are not."""
    steps = Steps()
    cb = small_callback(epochs=[1], kernels=kernels)
    trainer = make_trainer(tmp_path, [steps, cb], max_epochs=2)
    expected = re.escape(f"ManyLogits returns shape (4, {', '.join(map(str, shape))}) on 4 training examples")
    with pytest.raises(ModelError, match=expected + r".*one logit per example, shape \(4,\) or \(4, 1\).*\(4, k\)"):
        trainer.fit(ManyLogits(shape), datamodule=ToyData())
    assert steps.batches == 0 and trainer.global_step == 0 and cb.results == []


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ((0, 2), r"labels \[0, 2\] \(train\).*0 and 1 \(or -1 and 1\) are supported"),
        ((0.25, 0.75), r"train subset's labels are not whole numbers \(e.g. \[0.25, 0.75"),
    ],
)
def test_labels_the_svm_cannot_use_are_refused_before_any_training_step(tmp_path, labels, match):
    dm = ToyData()
    for split in ("train", "test"):
        y = getattr(dm, f"y_{split}")
        setattr(dm, f"y_{split}", torch.where(y == 0, labels[0], labels[1]))
    steps = Steps()
    trainer = make_trainer(tmp_path, [steps, small_callback(epochs=[1], kernels=["ntk"])], max_epochs=2)
    with pytest.raises(DataError, match=match):
        trainer.fit(PlainLogit(), datamodule=dm)
    assert steps.batches == 0 and trainer.global_step == 0


@pytest.mark.parametrize("soft_margin_c", [1.0, None])
def test_non_separable_kernel_is_recorded_not_fatal(tmp_path, soft_margin_c):
    logger = MemoryLogger()
    cb = small_callback(epochs=[0], at_end=False, n_train=96, soft_margin_c=soft_margin_c)
    with pytest.warns(UserWarning, match="no hard-margin SVM"):
        make_trainer(tmp_path, [cb], max_epochs=1, logger=logger).fit(
            MLPClassifier(input_shape=SHAPE, width=8), datamodule=ToyData(flip_duplicates=True)
        )
    assert len(cb.results) == 2
    for r in cb.results:
        assert r["svm_separable"] == 0 and math.isnan(r["svm_test_acc"])
    if soft_margin_c is None:
        assert all(math.isnan(r["svm_soft_test_acc"]) for r in cb.results)
        assert "not separable" in cb.summary_table()
        assert logger.values("afterkernel/ntk/svm_soft_test_acc") == []
    else:
        assert all(0 <= r["svm_soft_test_acc"] <= 1 for r in cb.results)
        # the NTK's soft-margin SVM still classifies the (easy) test images
        assert next(r for r in cb.results if r["kernel"] == "ntk")["svm_soft_test_acc"] > 0.7
        assert "(soft)" in cb.summary_table()
        assert logger.values("afterkernel/ntk/svm_soft_test_acc") == [cb.results[0]["svm_soft_test_acc"]]
    assert logger.values("afterkernel/ntk/svm_separable") == [0.0]


def test_bad_soft_margin_c():
    with pytest.raises(ConfigurationError, match="soft_margin_c"):
        AfterKernelCallback(soft_margin_c=0.0)


# ---------------------------------------------------------------- checkpoints
def test_resume_restores_results_and_initial_kernel(tmp_path):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = small_callback(epochs=[0, 1, 3], at_end=False)
    make_trainer(tmp_path, [cb, ckpt], max_epochs=2).fit(wide_mlp(), datamodule=ToyData())
    first = [dict(r) for r in cb.results]
    assert cb.done_epochs == [0, 1]

    resumed = small_callback(epochs=[0, 1, 3], at_end=False)
    make_trainer(tmp_path, [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], max_epochs=3).fit(
        wide_mlp(), datamodule=ToyData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert resumed.done_epochs == [0, 1, 3]
    assert json.dumps(resumed.results[: len(first)]) == json.dumps(first)  # restored, not recomputed
    assert torch.equal(resumed._record.initial_kernels["ntk"], cb._record.initial_kernels["ntk"])
    late = [r for r in resumed.results if r["epoch"] == 3]
    assert all(0 < r["alignment_to_initial"] < 1 for r in late)


@pytest.mark.parametrize("rows_in", ["checkpoint", "results file"])
def test_a_resumed_fit_refuses_invariance_scores_of_other_images(tmp_path, rows_in):
    """Scores computed on training images (the only choice before invariance_images, so also any checkpoint or
    results file without the key) and a resume set to test images: the fit stops before computing anything,
    naming the setting that resumes, whether the scored rows are in the checkpoint or only in the results file
    (the at_end row, computed after the last checkpoint). validate/test with the same checkpoint are not refused,
    and with matching images the fit resumes."""
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    epochs = [0] if rows_in == "checkpoint" else []
    first = small_callback(epochs=epochs, at_end=True, invariance_images="train", n_invariance=8)
    make_trainer(tmp_path, [first, ckpt], max_epochs=2).fit(wide_mlp(), datamodule=ToyData())
    last = str(tmp_path / "ckpt" / "last.ckpt")
    state = torch.load(last, weights_only=False)
    key = next(k for k in state["callbacks"] if "AfterKernelCallback" in k)
    del state["callbacks"][key]["invariance_images"]  # as a checkpoint from before the option
    torch.save(state, last)

    resumed = small_callback(epochs=epochs, at_end=True, n_invariance=8)
    trainer = make_trainer(tmp_path, [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], max_epochs=4)
    with pytest.raises(ConfigurationError, match=r"training images.*Resume with invariance_images='train'"):
        trainer.fit(wide_mlp(), datamodule=ToyData(), ckpt_path=last)
    assert all(r["epoch"] < 4 for r in resumed.results)  # nothing computed
    make_trainer(tmp_path, [small_callback(n_invariance=8)]).validate(wide_mlp(), datamodule=ToyData(), ckpt_path=last)

    again = small_callback(epochs=epochs, at_end=True, invariance_images="train", n_invariance=8)
    make_trainer(tmp_path, [again, ModelCheckpoint(dirpath=tmp_path / "ckpt3")], max_epochs=4).fit(
        wide_mlp(), datamodule=ToyData(), ckpt_path=last
    )
    assert again.done_epochs[0] == (0 if epochs else 2) and again.done_epochs[-1] == 4
    assert small_callback(n_invariance=0)._record.images_conflict("train", first.results, "x") is None  # no new scores


def test_resume_catches_up_an_epoch_the_checkpoint_missed(tmp_path):
    """A checkpoint written at validation end precedes on_train_epoch_end: the resumed run computes that epoch."""
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_train_epoch_end=False)
    cb = small_callback(epochs=[0, 2], at_end=False)
    make_trainer(tmp_path, [cb, ckpt], max_epochs=2).fit(wide_mlp(), datamodule=ToyData())
    assert cb.done_epochs == [0, 2]
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][cb.state_key]
    assert sorted({r["epoch"] for r in state["results"]}) == [0]

    resumed = small_callback(epochs=[0, 2], at_end=False)
    make_trainer(tmp_path, [resumed], max_epochs=2).fit(
        wide_mlp(), datamodule=ToyData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert resumed.done_epochs == [0, 2]
    again = {r["kernel"]: r["svm_test_acc"] for r in resumed.results if r["epoch"] == 2}
    orig = {r["kernel"]: r["svm_test_acc"] for r in cb.results if r["epoch"] == 2}
    assert again == pytest.approx(orig)  # same weights (end of epoch 2), same subsets, same answer


def test_state_keys_differ_between_instances():
    assert small_callback(seed=0).state_key != small_callback(seed=1).state_key


# ---------------------------------------------------------------- review findings
def test_resume_with_a_longer_schedule_keeps_earlier_results(tmp_path):
    pl.seed_everything(0)
    cb = small_callback(epochs=[0, 1], at_end=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [cb, ckpt], max_epochs=2).fit(wide_mlp(), datamodule=ToyData())
    longer = small_callback(epochs=[0, 1, 3], at_end=False)
    make_trainer(tmp_path, [longer], max_epochs=3).fit(
        wide_mlp(), datamodule=ToyData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert longer.done_epochs == [0, 1, 3]
    assert json.dumps(longer.results[:4]) == json.dumps(cb.results)
    assert all(0 < r["alignment_to_initial"] < 1 for r in longer.results if r["epoch"] == 3)


def test_resume_from_a_checkpoint_without_callback_state_never_calls_trained_weights_initial(tmp_path):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [ckpt], max_epochs=2).fit(wide_mlp(), datamodule=ToyData())
    cb = small_callback(epochs=[2, 3], at_end=False)
    make_trainer(tmp_path, [cb], max_epochs=3).fit(
        wide_mlp(), datamodule=ToyData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert cb.done_epochs == [2, 3]
    assert cb._record.initial_kernels == {}
    assert all(math.isnan(r["alignment_to_initial"]) for r in cb.results)
    assert "initial" not in cb.summary_table()


def test_results_file_is_strict_json(tmp_path):
    cb = small_callback(epochs=[0], at_end=False, dirpath=str(tmp_path))
    make_trainer(tmp_path, [cb], max_epochs=1).fit(wide_mlp(), datamodule=ToyData())

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    saved = json.loads((tmp_path / "afterkernel_results.json").read_text(), parse_constant=refuse)
    assert all(r["svm_soft_test_acc"] is None for r in saved["results"])  # NaN in memory, null on disk
    assert (tmp_path / "afterkernel_initial_kernels.pt").is_file()


def test_generic_datamodule_with_only_dataloaders(tmp_path):
    class LoadersOnly(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(*toy_data(64, 0)), batch_size=16)

        def val_dataloader(self):
            return DataLoader(TensorDataset(*toy_data(32, 1)), batch_size=16)

    cb = small_callback(epochs=[0], at_end=False, n_train=30, n_test=20)
    make_trainer(tmp_path, [cb], max_epochs=1).fit(wide_mlp(), datamodule=LoadersOnly())
    assert cb.done_epochs == [0]


def test_plain_loaders_when_validation_is_not_due_at_the_start(tmp_path):
    x, y = toy_data(64, 0)
    cb = small_callback(epochs=[0], at_end=False, n_train=30, n_test=20)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1, check_val_every_n_epoch=2, num_sanity_val_steps=0)
    trainer.fit(
        wide_mlp(),
        DataLoader(TensorDataset(x, y), batch_size=16),
        DataLoader(TensorDataset(*toy_data(32, 1)), batch_size=16),
    )
    assert cb.done_epochs == [0]


def test_network_accuracy_with_plus_minus_one_labels(tmp_path):
    """Labels in {-1, 1} (accepted by the SVM) must not turn the network's accuracy into nonsense."""
    dm = ToyData()
    dm.y_train, dm.y_test = 2 * dm.y_train - 1, 2 * dm.y_test - 1
    model = PlainLogit()
    initial = copy.deepcopy(model)
    cb = small_callback(epochs=[0], at_end=False, kernels=["ntk"])
    make_trainer(tmp_path, [cb], max_epochs=1).fit(model, datamodule=dm)
    idx = cb._record.indices["test"]
    with torch.no_grad():
        expected = float(((initial(dm.x_test[idx]) > 0) == (dm.y_test[idx] > 0)).double().mean())
    assert cb.results[0]["network_test_acc"] == pytest.approx(expected)
    assert 0 < expected < 1


@pytest.mark.parametrize("svm", [{"time_limit": -1}, {"backend": "nope"}, {"margin_tol": 5}])
def test_bad_svm_values_fail_at_construction(svm):
    with pytest.raises(ConfigurationError):
        AfterKernelCallback(svm=svm)


def test_submodule_modes_are_restored(tmp_path):
    model = VGGClassifier(input_shape=SHAPE, width=2)
    frozen = model.body[0]

    class Freeze(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            frozen.eval()

        def on_train_epoch_end(self, trainer, pl_module):
            Freeze.seen = (pl_module.training, frozen.training)

    make_trainer(tmp_path, [Freeze(), small_callback(epochs=[0, 1], at_end=False)], max_epochs=1).fit(
        model, datamodule=ToyData()
    )
    assert Freeze.seen == (True, False)
    assert model.training and not frozen.training


def test_a_submodule_named_features_is_not_the_penultimate_layer(tmp_path):
    class TorchvisionStyle(PlainLogit):
        def __init__(self):
            super().__init__()
            self.features = nn.Identity()  # like torchvision's VGG: a layer stack, not a method

    cb = small_callback(epochs=[0], at_end=False)
    with pytest.warns(UserWarning, match="submodule named `features` does not count"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(TorchvisionStyle(), datamodule=ToyData())
    assert {r["kernel"] for r in cb.results} == {"ntk"}


def test_epochs_beyond_max_epochs_are_announced(tmp_path):
    cb = small_callback(epochs=[0, 5], at_end=False)
    with pytest.warns(UserWarning, match=r"epochs \[5\] lie beyond max_epochs=1"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(wide_mlp(), datamodule=ToyData())
    assert cb.done_epochs == [0]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.endswith("_time_s") and not isinstance(v, str)}


def test_ddp_two_processes_shard_the_ntk_and_match_a_single_process(tmp_path):
    """2-process gloo DDP: each rank computes its share of the NTK, one all-reduce sums them, rank 0 alone writes;
    the epoch-0 results equal a single-process run's and the final kernels equal a single-process kernel.
    (Rank-0-only work must not call collectives: Trainer.log_dir broadcasts; this used to hang.)"""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    single.mkdir()
    script = Path(__file__).with_name("ddp_fit_script.py")
    result = subprocess.run(
        [sys.executable, str(script), str(ddp), "2"], capture_output=True, text=True, timeout=300, cwd=ddp
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((ddp / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["done"] == [0, 1, 2]  # epochs 0, 1 and the end (2)
    for rank, info in enumerate(ranks):  # both ranks worked at every evaluation, on disjoint entries
        assert [c["shard"] for c in info["calls"]] == [[rank, 2]] * 3
        assert all(0 < c["nonzero"] < c["total"] for c in info["calls"])
    assert [a["nonzero"] + b["nonzero"] for a, b in zip(*(r["calls"] for r in ranks), strict=True)] == [
        c["total"] for c in ranks[0]["calls"]
    ]
    saved = json.loads((ddp / "afterkernel_results.json").read_text())["results"]
    assert sorted({r["epoch"] for r in saved}) == [0, 1, 2]

    reference = _load_script("ddp_fit_script").main(single, devices=1)
    assert [c["shard"] for c in json.loads((single / "rank0.json").read_text())["calls"]] == [None] * 3
    ddp_rows = json.loads((ddp / "results.json").read_text())
    for ours, theirs in zip(ddp_rows[:2], reference.results[:2], strict=True):
        assert ours["epoch"] == 0 and ours["kernel"] == theirs["kernel"]
        assert _comparable(ours) == pytest.approx(_comparable(theirs), rel=1e-6, nan_ok=True)

    # the kernels of the DDP run's final weights equal a single-process computation on those weights
    model = MLPClassifier(input_shape=SHAPE, width=16)
    model.load_state_dict(torch.load(ddp / "final.pt", weights_only=True))
    saved_kernel = torch.load(ddp / "kernels" / "epoch_2_ntk.pt", weights_only=True)
    x = _load_script("ddp_fit_script").toy_inputs()
    k_train, k_test = empirical_ntk_train_test(
        model, x[saved_kernel["train_indices"]], x[saved_kernel["test_indices"]], dtype=torch.float64
    )
    for ours, theirs in ((saved_kernel["k_train"], k_train), (saved_kernel["k_test"], k_test)):
        assert ours.dtype == torch.float64
        assert float((ours - theirs).norm() / theirs.norm()) <= 1e-6


# ---------------------------------------------------------------- killed runs, corrupt files
def _wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) before it could be killed")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _saved_rows(folder: Path) -> list[dict]:
    try:
        return json.loads((folder / "afterkernel" / "afterkernel_results.json").read_text())["results"]
    except (FileNotFoundError, ValueError):
        return []


@pytest.mark.parametrize("when", ["training", "kernel"])
def test_a_killed_run_resumes_its_schedule_and_loses_nothing(tmp_path, when):
    """SIGKILL a real run during training (after epoch 1's results) or inside epoch 2's kernel computation, resume
    with ckpt_path='last' in a fresh process: epochs 0..3 each once, the rows from before the kill unchanged."""
    script = Path(__file__).with_name("resume_fit_script.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if when == "training":
        env["AFTERKERNEL_TEST_BATCH_SLEEP"] = "0.3"
    else:
        env["AFTERKERNEL_TEST_HANG_EPOCH"] = "2"
    run = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if when == "training":
            last = tmp_path / "ckpt" / "last.ckpt"
            _wait_for(lambda: last.is_file() and 1 in {r["epoch"] for r in _saved_rows(tmp_path)}, run)
            time.sleep(0.3)  # inside epoch 2's training batches (6 x 0.3 s)
        else:
            _wait_for((tmp_path / "hanging").is_file, run)
        before = _saved_rows(tmp_path)
        run.send_signal(signal.SIGKILL)
    finally:
        run.kill()
        run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL
    assert sorted({r["epoch"] for r in before}) == [0, 1]  # killed before epoch 2's results

    env.pop("AFTERKERNEL_TEST_BATCH_SLEEP", None)
    env.pop("AFTERKERNEL_TEST_HANG_EPOCH", None)
    resumed = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "resume"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout
    assert "rewriting" not in resumed.stderr  # the results file was intact
    after = _saved_rows(tmp_path)
    assert sorted((r["epoch"], r["kernel"]) for r in after) == [(e, k) for e in range(4) for k in ("ck", "ntk")]
    assert after[: len(before)] == before  # kept as they were (kernel_time_s included), not recomputed
    assert all(r["step"] == 6 * r["epoch"] for r in after)
    assert all(0 < r["alignment_to_initial"] <= 1 for r in after if r["kernel"] == "ntk")


class Poison(pl.Callback):
    """Puts a NaN into the first weight at the end of epoch `at` (before AfterKernelCallback, listed after it)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 == self.at:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = math.nan


class NaNGradient(PlainLogit):
    """Finite outputs, NaN kernel: a hidden unit fixed at 0 goes through sqrt(h^2), whose derivative there is 0/0."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.net[1].weight[0] = 0.0
            self.net[1].bias[0] = 0.0

    def forward(self, x):
        h = self.net[1](self.net[0](x))
        return self.net[3](torch.sqrt(h * h)).squeeze(-1)


def test_on_error_is_checked():
    with pytest.raises(ConfigurationError, match="on_error"):
        small_callback(on_error="ignore")


def test_non_finite_network_outputs_raise_naming_the_epoch(tmp_path):
    cb = small_callback(epochs=[0, 1], at_end=False)
    with pytest.raises(KernelError, match=r"network's outputs at epoch 1 are not finite.*on_error='warn'"):
        make_trainer(tmp_path, [Poison(at=1), cb], max_epochs=2).fit(wide_mlp(), datamodule=ToyData())
    assert cb.done_epochs == [0]


def test_non_finite_network_outputs_with_warn_are_recorded_and_training_goes_on(tmp_path, capsys):
    logger = MemoryLogger()
    cb = small_callback(epochs=[0, 1, 2], at_end=False, on_error="warn", dirpath=str(tmp_path))
    trainer = make_trainer(tmp_path, [Poison(at=1), cb], max_epochs=2, logger=logger)
    with pytest.warns(UserWarning, match="network's outputs at epoch 1 are not finite"):
        trainer.fit(wide_mlp(), datamodule=ToyData())
    assert trainer.current_epoch == 2 and cb.done_epochs == [0, 1, 2]
    failed = [r for r in cb.results if r["epoch"] >= 1]
    assert len(failed) == 4 and all("not finite" in r["error"] for r in failed)
    assert all(math.isnan(r[key]) for r in failed for key in ("svm_test_acc", "kta", "invariance_shift"))
    assert all("error" not in r and r["svm_test_acc"] > 0.5 for r in cb.results if r["epoch"] == 0)
    assert math.isnan(logger.values("afterkernel/ntk/svm_test_acc")[1])
    saved = json.loads((tmp_path / "afterkernel_results.json").read_text())["results"]
    assert saved[-1]["svm_test_acc"] is None and "not finite" in saved[-1]["error"]
    assert "failed" in cb.summary_table()


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_non_finite_kernel_names_the_epoch_and_kernel(tmp_path, on_error):
    model = NaNGradient()
    assert torch.isfinite(model(toy_data(8, 0)[0])).all()
    cb = small_callback(epochs=[0], at_end=False, on_error=on_error, n_invariance=0)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1)
    if on_error == "raise":
        with pytest.raises(KernelError, match=r"the NTK at epoch 0 has non-finite entries"):
            trainer.fit(model, datamodule=ToyData())
        return
    with pytest.warns(UserWarning, match=r"the NTK at epoch 0 has non-finite entries"):
        trainer.fit(model, datamodule=ToyData())
    assert trainer.current_epoch == 1
    (row,) = cb.results
    assert row["kernel"] == "ntk" and "non-finite" in row["error"] and math.isnan(row["svm_test_acc"])
    assert cb._record.initial_kernels == {}


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_out_of_memory_after_every_retry_never_stops_training(tmp_path, monkeypatch, on_error):
    """The engine halves its budget and retries on out-of-memory, then gives up with a KernelError: the
    evaluation is recorded as failed and training goes on, whatever on_error says (it governs real errors)."""
    from lightning_afterkernel.kernels import empirical

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(empirical._Engine, "train_test", no_memory)
    cb = small_callback(epochs=[0], at_end=False, on_error=on_error, n_invariance=0)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1)
    with pytest.warns(UserWarning, match="retrying with half the memory budget"):
        trainer.fit(wide_mlp(), datamodule=ToyData())
    assert trainer.current_epoch == 1
    ntk, ck = cb.results
    assert "out of memory" in ntk["error"] and "ran out of memory 5" in ntk["error"]
    assert math.isnan(ntk["svm_test_acc"])
    assert "error" not in ck and ck["svm_test_acc"] > 0.5  # the CK still computed and judged


def test_an_unsupported_layer_takes_the_general_path_and_still_gets_ntk_results(tmp_path):
    class WithLayerNorm(PlainLogit):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))

    model = WithLayerNorm()
    cb = small_callback(epochs=[0], at_end=False, kernels=["ntk"], n_invariance=4)
    with pytest.warns(UserWarning, match="general per-example-gradient path"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(model, datamodule=ToyData())
    (row,) = cb.results
    assert "error" not in row and 0.5 < row["svm_test_acc"] <= 1 and row["svm_separable"] == 1
    assert 0 < row["invariance_shift"] <= 1


def _first_run_with_checkpoint(tmp_path) -> tuple[AfterKernelCallback, Path]:
    pl.seed_everything(0)
    cb = small_callback(epochs=[0, 1, 2], at_end=False, dirpath=str(tmp_path / "ak"))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [cb, ckpt], max_epochs=1).fit(wide_mlp(), datamodule=ToyData())
    assert cb.done_epochs == [0, 1]
    return cb, tmp_path / "ckpt" / "last.ckpt"


def _resume(tmp_path, last: Path) -> tuple[AfterKernelCallback, MLPClassifier]:
    pl.seed_everything(1)  # the same shuffling in every resumed run
    model = wide_mlp()
    cb = small_callback(epochs=[0, 1, 2], at_end=False, dirpath=str(tmp_path / "ak"))
    make_trainer(tmp_path, [cb], max_epochs=2).fit(model, datamodule=ToyData(), ckpt_path=str(last))
    return cb, model


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "other run"])
def test_a_corrupt_or_partial_results_file_is_rewritten_on_resume(tmp_path, damage):
    first, last = _first_run_with_checkpoint(tmp_path)
    path = tmp_path / "ak" / "afterkernel_results.json"
    intact = json.loads(path.read_text())["results"]
    if damage == "truncated":
        path.write_text(path.read_text()[:200])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff" * 50)
    elif damage == "missing":
        path.unlink()
    else:
        path.write_text(json.dumps({"results": intact[:1]}))
    with pytest.warns(UserWarning, match="rewriting it from the checkpoint's results"):
        _resume(tmp_path, last)
    saved = json.loads(path.read_text())["results"]
    assert sorted({r["epoch"] for r in saved}) == [0, 1, 2]
    assert saved[: len(intact)] == intact


def test_a_corrupt_initial_kernels_file_is_recomputed_from_the_epoch_0_weights(tmp_path):
    first, last = _first_run_with_checkpoint(tmp_path)
    side = tmp_path / "ak" / "afterkernel_initial_kernels.pt"
    assert (tmp_path / "ak" / "afterkernel_initial_weights.pt").is_file()
    reference, reference_model = _resume(tmp_path, last)  # intact side file

    side.write_bytes(side.read_bytes()[:300])  # truncated
    with pytest.warns(UserWarning, match="unreadable.*recomputing the epoch-0"):
        repaired, repaired_model = _resume(tmp_path, last)
    for name in ("ntk", "ck"):
        ours, theirs = repaired._record.initial_kernels[name], first._record.initial_kernels[name]
        assert float((ours - theirs).norm() / theirs.norm()) <= 1e-6
    keys = ("alignment_to_initial", "cka_to_initial", "distance_to_initial")
    late = [r[k] for r in repaired.results if r["epoch"] == 2 for k in keys]
    assert late == pytest.approx([r[k] for r in reference.results if r["epoch"] == 2 for k in keys], rel=1e-5)
    for a, b in zip(repaired_model.state_dict().values(), reference_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the trained weights were restored bit-exactly: training is unaffected
    assert torch.load(side, weights_only=True).keys() == {"ntk", "ck"}  # the file is rewritten

    side.unlink()  # recomputed from the checkpoint's own epoch-0 weights
    (tmp_path / "ak" / "afterkernel_initial_weights.pt").write_text("garbage")
    with pytest.warns(UserWarning, match="missing; recomputing the epoch-0 .* from the checkpoint's epoch-0 weights"):
        again, _ = _resume(tmp_path, last)
    assert [r["alignment_to_initial"] for r in again.results] == [r["alignment_to_initial"] for r in repaired.results]
    assert torch.load(tmp_path / "ak" / "afterkernel_initial_weights.pt", weights_only=True).keys() == set(
        first._record.initial_weights
    )

    state = torch.load(last, weights_only=False)  # a checkpoint written before the weights were kept in it
    del next(s for key, s in state["callbacks"].items() if key.startswith("AfterKernelCallback"))["initial_weights"]
    torch.save(state, last)
    side.unlink()
    (tmp_path / "ak" / "afterkernel_initial_weights.pt").write_text("garbage")
    with pytest.warns(
        UserWarning, match="missing, and the epoch-0 weights are not in the checkpoint .* cannot be read"
    ):
        lost, _ = _resume(tmp_path, last)
    assert lost.done_epochs == [0, 1, 2]
    assert all(math.isnan(r["alignment_to_initial"]) for r in lost.results if r["epoch"] == 2)


# ---------------------------------------------------------------- second review (resume, reuse, data sources)
def test_a_second_resume_in_a_new_folder_still_finds_the_epoch_0_kernels(tmp_path, recwarn):
    """Each run writes to a new folder (as a new logger version or W&B run does); the checkpoint of a resumed run
    must name the epoch-0 files where they are, so the run after it still has its initial kernels."""
    last = None
    for run, max_epochs in enumerate((1, 2, 3)):
        pl.seed_everything(run)
        cb = small_callback(epochs=[0, 1, 2, 3], at_end=False, dirpath=str(tmp_path / f"run{run}"))
        ckpt = ModelCheckpoint(dirpath=tmp_path / f"ckpt{run}", save_last=True)
        make_trainer(tmp_path, [cb, ckpt], max_epochs=max_epochs).fit(
            wide_mlp(), datamodule=ToyData(), ckpt_path=str(last) if last else None
        )
        last = tmp_path / f"ckpt{run}" / "last.ckpt"
    assert cb.done_epochs == [0, 1, 2, 3]
    assert all(0 < r["alignment_to_initial"] < 1 for r in cb.results if r["epoch"] == 3)
    state = torch.load(last, weights_only=False)["callbacks"][cb.state_key]
    assert state["initial_kernels_file"] == str(tmp_path / "run0" / "afterkernel_initial_kernels.pt")
    assert state["initial_weights_file"] == str(tmp_path / "run0" / "afterkernel_initial_weights.pt")
    assert not [w for w in recwarn if "alignment_to_initial" in str(w.message)]


def test_the_at_end_row_on_the_checkpoints_weights_survives_a_longer_resume(tmp_path):
    """on_train_end evaluates after the last checkpoint was saved, on the same weights: kept, not dropped."""
    pl.seed_everything(0)
    folder = str(tmp_path / "ak")
    cb = small_callback(epochs=[0, 1], at_end=True, dirpath=folder)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [cb, ckpt], max_epochs=2).fit(wide_mlp(), datamodule=ToyData())
    assert cb.done_epochs == [0, 1, 2]
    at_end = [r for r in cb.results if r["epoch"] == 2]

    pl.seed_everything(1)
    longer = small_callback(epochs=[0, 1], at_end=True, dirpath=folder)
    make_trainer(tmp_path, [longer], max_epochs=4).fit(
        wide_mlp(), datamodule=ToyData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert longer.done_epochs == [0, 1, 2, 4]
    kept = [r for r in longer.results if r["epoch"] == 2]
    assert json.dumps(finite_or_none(kept)) == json.dumps(finite_or_none(at_end))
    saved = json.loads((tmp_path / "ak" / "afterkernel_results.json").read_text())["results"]
    assert sorted({r["epoch"] for r in saved}) == [0, 1, 2, 4]


def test_a_mid_epoch_checkpoint_never_labels_other_weights_with_an_epoch(tmp_path):
    """A checkpoint at step 9 (1.5 epochs of 6 batches): epoch 1's weights are gone; it is announced as missed,
    never evaluated on the step-9 weights."""
    pl.seed_everything(0)
    cb = small_callback(epochs=[0], at_end=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3)
    make_trainer(tmp_path, [cb, ckpt], max_epochs=5, max_steps=9).fit(wide_mlp(), datamodule=ToyData())
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 9

    resumed = small_callback(epochs=[0, 1, 2], at_end=False)
    with pytest.warns(UserWarning, match=r"resuming at step 9 \(epoch 1\); scheduled epochs \[1\]"):
        make_trainer(tmp_path, [resumed], max_epochs=2).fit(
            wide_mlp(), datamodule=ToyData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )
    assert [(r["epoch"], r["step"]) for r in resumed.results if r["kernel"] == "ntk"] == [(0, 0), (2, 12)]


def test_partial_epochs_are_never_labelled_as_whole_ones():
    cb = small_callback(epochs=[0, 2], at_end=True)
    for seen, total, label in ((1999, 2000, 1.9995), (1, 2000, 1.0005), (3, 6, 1.5), (1, 3, 1.333)):
        progress = types.SimpleNamespace(current=types.SimpleNamespace(completed=seen))
        trainer = types.SimpleNamespace(
            sanity_checking=False,
            current_epoch=1,
            num_training_batches=total,
            fit_loop=types.SimpleNamespace(epoch_loop=types.SimpleNamespace(batch_progress=progress)),
        )
        cb.on_train_epoch_end(trainer, None)
        assert cb._progress == label


def test_one_callback_reused_for_a_second_fit_starts_afresh(tmp_path):
    cb = small_callback(epochs=[0, 1], at_end=False, dirpath=str(tmp_path / "ak"))
    results = []
    for lr in (0.05, 0.2):
        pl.seed_everything(0)
        make_trainer(tmp_path, [cb], max_epochs=1).fit(wide_mlp(lr=lr), datamodule=ToyData())
        results.append([dict(r) for r in cb.results])
    pl.seed_everything(0)
    fresh = small_callback(epochs=[0, 1], at_end=False, dirpath=str(tmp_path / "fresh"))
    make_trainer(tmp_path, [fresh], max_epochs=1).fit(wide_mlp(lr=0.2), datamodule=ToyData())
    assert [(r["epoch"], r["step"]) for r in results[1]] == [(0, 0), (0, 0), (1, 6), (1, 6)]
    assert results[1][2]["svm_test_acc"] == fresh.results[2]["svm_test_acc"]
    assert results[1][2]["alignment_to_initial"] == fresh.results[2]["alignment_to_initial"]
    assert results[1][2]["alignment_to_initial"] != results[0][2]["alignment_to_initial"]


def test_named_callbacks_share_a_trainer_and_the_same_name_twice_is_an_error(tmp_path):
    logger = MemoryLogger()
    narrow = small_callback(epochs=[0], at_end=False, kernels=["ntk"], name="f32", dirpath=str(tmp_path))
    wide = small_callback(epochs=[0], at_end=False, kernels=["ntk"], name="f64", dtype="float64", dirpath=str(tmp_path))
    assert narrow.state_key != wide.state_key
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [narrow, wide, ckpt], max_epochs=1, logger=logger).fit(wide_mlp(), datamodule=ToyData())
    for name, cb in (("f32", narrow), ("f64", wide)):
        saved = json.loads((tmp_path / name / "afterkernel_results.json").read_text())["results"]
        assert [r["svm_test_acc"] for r in saved] == [r["svm_test_acc"] for r in cb.results]
        assert logger.values(f"afterkernel/{name}/ntk/svm_test_acc") == [cb.results[0]["svm_test_acc"]]
    assert narrow.results[0]["kta"] == pytest.approx(wide.results[0]["kta"], rel=1e-5)
    states = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert {narrow.state_key, wide.state_key} <= states.keys()

    for names in ((None, None), ("a", "a")):
        twins = [small_callback(kernels=["ntk"], name=names[0]), small_callback(kernels=["ck"], name=names[1])]
        with pytest.raises(ConfigurationError, match="more than one AfterKernelCallback .*Give each its own name"):
            make_trainer(tmp_path, twins, max_epochs=1).fit(wide_mlp(), datamodule=ToyData())


def test_a_test_loader_that_only_works_after_setup_test_falls_back_to_validation(tmp_path):
    """Lightning's documented datamodule pattern: the test split is built in setup('test') only."""

    class DocsStyle(pl.LightningDataModule):
        def setup(self, stage):
            if stage == "fit":
                self.ds_train, self.ds_val = TensorDataset(*toy_data(96, 0)), TensorDataset(*toy_data(48, 1))
            if stage == "test":
                self.ds_test = TensorDataset(*toy_data(48, 2))

        def train_dataloader(self):
            return DataLoader(self.ds_train, batch_size=16, shuffle=True)

        def val_dataloader(self):
            return DataLoader(self.ds_val, batch_size=16)

        def test_dataloader(self):
            return DataLoader(self.ds_test, batch_size=16)

    cb = small_callback(epochs=[0], at_end=False)
    make_trainer(tmp_path, [cb], max_epochs=1).fit(wide_mlp(), datamodule=DocsStyle())
    assert cb.done_epochs == [0]
    x_val = toy_data(48, 1)[0]
    assert all(any(torch.equal(x, v) for v in x_val) for x in cb._subsets.x_test)


@pytest.mark.parametrize("why", ["no validation_step", "limit_val_batches=0", "no loader at all"])
def test_validation_loaders_given_to_fit_are_found_even_when_no_validation_runs(tmp_path, why):
    cb = small_callback(epochs=[0], at_end=False, n_train=30, n_test=20, kernels=["ntk"])
    model = PlainLogit() if why == "no validation_step" else wide_mlp()
    trainer = make_trainer(tmp_path, [cb], max_epochs=1, limit_val_batches=0 if why != "no validation_step" else None)
    loaders = [DataLoader(TensorDataset(*toy_data(64, 0)), batch_size=16)]
    if why == "no loader at all":
        with pytest.raises(DataError, match="found no validation or test data"):
            trainer.fit(model, *loaders)
        return
    trainer.fit(model, *loaders, DataLoader(TensorDataset(*toy_data(32, 1)), batch_size=16))
    assert cb.done_epochs == [0]


def test_a_datasets_random_transforms_leave_training_unchanged(tmp_path):
    class Noisy(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):  # a random augmentation drawn from the global RNGs
            noise = 0.05 * torch.randn_like(self.x[i]) + 0.01 * float(np.random.rand() + random.random())
            return self.x[i] + noise, self.y[i]

    class Data(pl.LightningDataModule):
        def setup(self, stage):
            self.train_dataset = Noisy(*toy_data(96, 0))
            self.test_dataset = TensorDataset(*toy_data(48, 1))

        def train_dataloader(self):
            return DataLoader(self.train_dataset, batch_size=16, shuffle=True)

    def weights(callbacks):
        pl.seed_everything(0)
        model = wide_mlp()
        make_trainer(tmp_path, callbacks, max_epochs=1).fit(model, datamodule=Data())
        return model.state_dict()

    without = weights([])
    cb = small_callback(epochs=[0], at_end=False, kernels=["ntk"], n_invariance=0)
    with_callback = weights([cb])
    assert cb.done_epochs == [0]
    for key, value in without.items():
        assert torch.equal(value, with_callback[key]), key


def test_a_kernel_that_fails_at_the_last_evaluation_keeps_its_curve(tmp_path, monkeypatch):
    calls, drawn = [], []
    real_ntk, real_curves = evaluation.empirical_ntk_train_test, _figures.accuracy_curves

    def failing_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_ntk(*args, **kwargs)

    def spy(path, results, kernels, *rest):
        drawn.append(list(kernels))
        return real_curves(path, results, kernels, *rest)

    monkeypatch.setattr(evaluation, "empirical_ntk_train_test", failing_third)
    monkeypatch.setattr(_figures, "accuracy_curves", spy)
    cb = small_callback(epochs=[0, 1, 2], at_end=False, figures=True, dirpath=str(tmp_path), n_invariance=0)
    with pytest.warns(UserWarning, match="out of memory"):
        make_trainer(tmp_path, [cb], max_epochs=2).fit(wide_mlp(), datamodule=ToyData())
    assert [("error" in r) for r in cb.results if r["kernel"] == "ntk"] == [False, False, True]
    assert drawn[-1] == ["ntk", "ck"]


def test_ddp_resume_keeps_rows_computed_after_the_checkpoint_on_every_rank(tmp_path):
    """A checkpoint saved at validation end precedes the callback's epoch-end evaluation of the same weights. On a
    2-process resume rank 0 keeps those rows from the results file and must tell rank 1, or rank 1 alone would
    evaluate that epoch again and enter collectives rank 0 never joins (a hang)."""
    script = Path(__file__).with_name("ddp_fit_script.py")

    def run(*args: str) -> None:
        result = subprocess.run(
            [sys.executable, str(script), str(tmp_path), "2", *args], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]

    run("1", "checkpoint")
    first = json.loads((tmp_path / "results.json").read_text())
    assert sorted({r["epoch"] for r in first}) == [0, 1]
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    states = [s for key, s in state.items() if key.startswith("AfterKernelCallback")]
    assert [sorted({r["epoch"] for r in s["results"]}) for s in states] == [[0]]
    run("2", "resume")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["done"] == [0, 1, 2] and ranks[1]["done"] == [0, 1]  # rank 1: restored and kept rows only
    assert [c["shard"] for c in ranks[1]["calls"]] == [[1, 2]]  # one evaluation (epoch 2) in the resumed run
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert json.dumps(resumed[: len(first)]) == json.dumps(first)
