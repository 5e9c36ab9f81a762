"""AfterKernelCallback's kernel analyses: metrics against direct computations, figures, saved kernels, options,
resume, and models without a conjugate kernel."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.loggers.logger import Logger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_afterkernel.callbacks import AfterKernelCallback
from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.invariance import invariance_scores
from lightning_afterkernel.kernels import (
    centered_kernel_alignment,
    conjugate_kernel,
    effective_rank,
    empirical_ntk,
    kernel_alignment,
    kernel_distance,
    kernel_target_alignment,
)
from lightning_afterkernel.models import MLPClassifier

SHAPE = (1, 8, 8)
FAMILIES = ("globalness", "shift", "rotation", "zoom")
PER_KERNEL = ("kta", "effective_rank", "effective_rank_entropy", "distance_to_initial", "cka_to_initial")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def toy_data(n: int, seed: int, shape: tuple[int, ...] = SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.6 * torch.rand(n, *shape, generator=g)
    x[y == 1, ..., : shape[-1] // 2] += 0.4
    return x, y


class ToyData(pl.LightningDataModule):
    plus_class, minus_class = 8, 3

    def __init__(self, shape: tuple[int, ...] = SHAPE) -> None:
        super().__init__()
        self.x_train, self.y_train = toy_data(64, 0, shape)
        self.x_test, self.y_test = toy_data(32, 1, shape)

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=16, shuffle=True)


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    name = "memory"
    version = 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def keys(self) -> set[str]:
        return {k for _, m in self.rows for k in m}

    def values(self, key: str) -> list[float]:
        return [m[key] for _, m in self.rows if key in m]


class PlainLogit(pl.LightningModule):
    """A user's own module: one logit, no `features` method."""

    def __init__(self, d_in: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), y.float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_trainer(tmp_path, callbacks, max_epochs=1, logger=None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )


def callback(tmp_path: Path, **kwargs) -> AfterKernelCallback:
    options = {"epochs": [0], "at_end": True, "n_train": 32, "n_test": 16, "n_invariance": 12, "verbose": False}
    options.update(figures=False, dirpath=str(tmp_path / "out"))
    options.update(kwargs)
    return AfterKernelCallback(**options)


def wide_mlp() -> MLPClassifier:
    return MLPClassifier(input_shape=SHAPE, width=48, lr=0.1)


# ---------------------------------------------------------------- metrics against direct computations
@pytest.mark.parametrize("images", ["test", "train", None])
def test_every_new_metric_equals_a_direct_computation(tmp_path, images):
    """Every analysis against the function that computes it; the invariance scores on the first images of the
    test subset (the default, None, as the author's code) or of the train subset."""
    pl.seed_everything(0)
    logger = MemoryLogger()
    cb = callback(tmp_path) if images is None else callback(tmp_path, invariance_images=images)
    model = wide_mlp()
    initial = copy.deepcopy(model)
    dm = ToyData()
    make_trainer(tmp_path, [cb], max_epochs=2, logger=logger).fit(model, datamodule=dm)
    assert cb.done_epochs == [0, 2]

    x_tr, y_tr = dm.x_train[cb._record.indices["train"]], dm.y_train[cb._record.indices["train"]]
    x_inv = x_tr if images == "train" else dm.x_test[cb._record.indices["test"]]
    functions = {"ntk": empirical_ntk, "ck": conjugate_kernel}
    k0 = {name: fn(initial, x_tr).double() for name, fn in functions.items()}
    for epoch, net in ((0, initial), (2, model)):
        grams = {name: fn(net, x_tr).double() for name, fn in functions.items()}
        for name, k in grams.items():
            row = next(r for r in cb.results if r["epoch"] == epoch and r["kernel"] == name)
            expected = {
                "kta": kernel_target_alignment(k, y_tr),
                "effective_rank": effective_rank(k, "trace"),
                "effective_rank_entropy": effective_rank(k, "entropy"),
                "distance_to_initial": kernel_distance(k, k0[name], "frobenius"),
                "cka_to_initial": centered_kernel_alignment(k, k0[name]),
                "alignment_ntk_ck": kernel_alignment(grams["ntk"], grams["ck"]),
                "cka_ntk_ck": centered_kernel_alignment(grams["ntk"], grams["ck"]),
            }
            scores = invariance_scores(net, x_inv[:12], kernel=name)
            expected.update({f"invariance_{f}": scores[f] for f in FAMILIES})
            for key, value in expected.items():
                assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (epoch, name, key)
                logged = key if key.endswith("ntk_ck") else f"{name}/{key}"
                logged = logged.replace("invariance_", "invariance/")
                assert logger.values(f"afterkernel/{logged}")[[0, 2].index(epoch)] == pytest.approx(row[key])
    late = {r["kernel"]: r for r in cb.results if r["epoch"] == 2}
    assert all(late[k]["distance_to_initial"] > 0.01 and late[k]["cka_to_initial"] < 1 for k in late)  # it moved
    table = cb.summary_table()
    assert "NTK kernel-target alignment" in table and "CK globalness" in table and "NTK zoom" in table
    assert f"over 12 {'training' if images == 'train' else 'test'} images" in table
    saved = json.loads((tmp_path / "out" / "afterkernel_results.json").read_text())
    assert saved["n_invariance"] == 12 and saved["invariance_families"] == list(FAMILIES)
    assert saved["invariance_images"] == (images or "test")
    assert all(r["invariance_shift"] is not None for r in saved["results"])


def test_n_invariance_zero_turns_scores_off_and_large_values_use_the_whole_subset(tmp_path):
    logger = MemoryLogger()
    off = callback(tmp_path, n_invariance=0, at_end=False, kernels=["ntk"])
    make_trainer(tmp_path, [off], logger=logger).fit(wide_mlp(), datamodule=ToyData())
    assert not any(k.startswith("invariance_") for k in off.results[0])
    assert not any("invariance" in k for k in logger.keys())

    pl.seed_everything(0)
    for images, n in (("test", 16), ("train", 32)):
        folder = tmp_path / images
        big = callback(folder, n_invariance=10_000, at_end=False, kernels=["ck"], invariance_images=images)
        model = wide_mlp()
        initial = copy.deepcopy(model)
        dm = ToyData()
        make_trainer(folder, [big], logger=logger).fit(model, datamodule=dm)
        x = (dm.x_test if images == "test" else dm.x_train)[big._record.indices[images]]
        assert len(x) == n
        expected = invariance_scores(initial, x, kernel="ck")  # every image of the subset
        assert big.results[0]["invariance_rotation"] == pytest.approx(expected["rotation"], rel=1e-5)
        assert json.loads((folder / "out" / "afterkernel_results.json").read_text())["n_invariance"] == n


def test_an_undefined_metric_is_nan_with_a_warning_and_training_goes_on(tmp_path):
    """A blank image has zero features under zero biases: its CK cosine is undefined; the NTK's is not."""
    dm = ToyData()
    cb = callback(tmp_path, n_train=64, n_invariance=64, at_end=False, invariance_images="train")
    dm.x_train[5] = 0.0
    with pytest.warns(UserWarning, match="CK invariance scores at epoch 0 are NaN"):
        make_trainer(tmp_path, [cb]).fit(wide_mlp(), datamodule=dm)
    rows = {r["kernel"]: r for r in cb.results}
    assert all(math.isnan(rows["ck"][f"invariance_{f}"]) for f in FAMILIES)
    assert all(0 < rows["ntk"][f"invariance_{f}"] <= 1 for f in FAMILIES)


def test_inputs_that_are_not_even_sized_images(tmp_path):
    odd = callback(tmp_path, at_end=False, kernels=["ntk"])
    with pytest.warns(UserWarning, match="globalness score is skipped"):
        make_trainer(tmp_path, [odd]).fit(PlainLogit(49), datamodule=ToyData(shape=(1, 7, 7)))
    assert [k for k in odd.results[0] if k.startswith("invariance_")] == [f"invariance_{f}" for f in FAMILIES[1:]]

    flat = callback(tmp_path / "flat", at_end=False, kernels=["ntk"], figures=True)
    with pytest.warns(UserWarning, match="invariance scores are skipped"):
        make_trainer(tmp_path, [flat]).fit(PlainLogit(16), datamodule=ToyData(shape=(16,)))
    assert not any(k.startswith("invariance_") for k in flat.results[0])
    assert not (tmp_path / "flat" / "out" / "figures" / "invariance.png").exists()
    assert (tmp_path / "flat" / "out" / "figures" / "kernel_heatmap_epoch_0.png").is_file()


# ---------------------------------------------------------------- figures
def test_figures_are_pngs_and_logged_to_wandb(tmp_path, monkeypatch):
    logged = []
    original = WandbLogger.log_image

    def spy(self, key, images, step=None, **kwargs):
        logged.append((key, list(images), step))
        return original(self, key=key, images=images, step=step, **kwargs)

    monkeypatch.setattr(WandbLogger, "log_image", spy)
    logger = WandbLogger(project="test", save_dir=str(tmp_path), offline=True)
    cb = callback(tmp_path, figures=True, dirpath=None)
    make_trainer(tmp_path, [cb], max_epochs=2, logger=logger).fit(wide_mlp(), datamodule=ToyData())
    logger.experiment.finish()

    folder = tmp_path / "afterkernel" / str(logger.version) / "figures"  # the W&B run's own folder
    names = [
        "kernel_heatmap_epoch_0.png",
        "kernel_heatmap_epoch_2.png",
        "eigenspectrum_epoch_0.png",
        "eigenspectrum_epoch_2.png",
        "invariance.png",
        "accuracy.png",
    ]
    for name in names:
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC, name
    keys = ["kernel_heatmap", "eigenspectrum", "accuracy", "invariance"]
    assert [(key, step) for key, _, step in logged] == [(f"afterkernel/figures/{k}", s) for s in (0, 8) for k in keys]
    assert all(Path(images[0]).parent == folder for _, images, _ in logged)
    media = list(tmp_path.glob("wandb/offline-run-*/files/media/images/afterkernel/figures/*.png"))
    assert len(media) == 8  # four figures at each of the two evaluations, in the offline run


def test_figures_off_writes_none(tmp_path):
    cb = callback(tmp_path, figures=False, at_end=False, kernels=["ntk"])
    make_trainer(tmp_path, [cb]).fit(wide_mlp(), datamodule=ToyData())
    assert not (tmp_path / "out" / "figures").exists()


# ---------------------------------------------------------------- saved kernels
def test_saved_kernels_load_and_match(tmp_path):
    pl.seed_everything(0)
    cb = callback(tmp_path, save_kernels=True, n_invariance=0)
    model = wide_mlp()
    initial = copy.deepcopy(model)
    dm = ToyData()
    make_trainer(tmp_path, [cb]).fit(model, datamodule=dm)
    folder = tmp_path / "out" / "kernels"
    assert sorted(p.name for p in folder.iterdir()) == [
        "epoch_0_ck.pt",
        "epoch_0_ntk.pt",
        "epoch_1_ck.pt",
        "epoch_1_ntk.pt",
    ]

    idx_tr, idx_te = cb._record.indices["train"], cb._record.indices["test"]
    x_tr, x_te = dm.x_train[idx_tr], dm.x_test[idx_te]
    for epoch, net in ((0, initial), (1, model)):
        for name, fn in (("ntk", empirical_ntk), ("ck", conjugate_kernel)):
            saved = torch.load(folder / f"epoch_{epoch}_{name}.pt", weights_only=True)
            assert saved["format"] == 1 and saved["kernel"] == name and saved["epoch"] == epoch
            assert saved["step"] == 4 * epoch  # 64 examples / 16 per batch
            assert saved["k_train"].shape == (32, 32) and saved["k_test"].shape == (16, 32)
            assert saved["k_train"].dtype == torch.float32
            torch.testing.assert_close(saved["k_train"], fn(net, x_tr), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(saved["k_test"], fn(net, x_te, x_tr), rtol=1e-4, atol=1e-5)
            assert torch.equal(saved["y_train"], dm.y_train[idx_tr]) and torch.equal(saved["y_test"], dm.y_test[idx_te])
            assert torch.equal(saved["train_indices"], idx_tr) and torch.equal(saved["test_indices"], idx_te)
            assert saved["model"] == "MLPClassifier" and saved["num_parameters"] == model.num_parameters()
            assert saved["hparams"]["width"] == 48 and saved["seed"] == 0
    assert not list(folder.glob(".*tmp*"))  # no temporary file left behind


# ---------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_invariance": -1}, "n_invariance=-1 must be a non-negative integer"),
        ({"n_invariance": 2.5}, "n_invariance=2.5"),
        ({"n_invariance": True}, "n_invariance=True"),
        ({"figures": "yes"}, "figures='yes' must be True or False"),
        ({"save_kernels": 1}, "save_kernels=1 must be True or False"),
    ],
)
def test_bad_analysis_options_raise_clear_errors(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        AfterKernelCallback(**kwargs)


# ---------------------------------------------------------------- resume and models without features
def test_resume_keeps_the_new_fields_and_measures_against_the_saved_initial_kernel(tmp_path):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = callback(tmp_path, epochs=[0, 1], at_end=False, figures=True)
    make_trainer(tmp_path, [first, ckpt]).fit(wide_mlp(), datamodule=ToyData())

    resumed = callback(tmp_path, epochs=[0, 1, 2], at_end=False, figures=True)
    make_trainer(tmp_path, [resumed], max_epochs=2).fit(
        wide_mlp(), datamodule=ToyData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert resumed.done_epochs == [0, 1, 2]
    assert json.dumps(resumed.results[:4]) == json.dumps(first.results)  # every field restored, none recomputed
    for row in resumed.results:
        assert all(key in row for key in PER_KERNEL + tuple(f"invariance_{f}" for f in FAMILIES))
    late = [r for r in resumed.results if r["epoch"] == 2]
    assert all(r["distance_to_initial"] > 0 and 0 < r["cka_to_initial"] < 1 for r in late)
    assert (tmp_path / "out" / "figures" / "eigenspectrum_epoch_2.png").is_file()
    assert set(resumed._record.initial_spectra) == {"ntk", "ck"}  # the initial spectrum recomputed from the side file


def test_model_without_features_gets_every_ntk_analysis_and_no_ck(tmp_path):
    logger = MemoryLogger()
    cb = callback(tmp_path, figures=True)
    with pytest.warns(UserWarning, match="conjugate kernel is skipped"):
        make_trainer(tmp_path, [cb], logger=logger).fit(PlainLogit(), datamodule=ToyData())
    assert {r["kernel"] for r in cb.results} == {"ntk"}
    for row in cb.results:
        assert all(math.isfinite(row[k]) for k in PER_KERNEL + tuple(f"invariance_{f}" for f in FAMILIES))
        assert "cka_ntk_ck" not in row and "alignment_ntk_ck" not in row
    assert not any(k.startswith("afterkernel/ck/") or k.endswith("ntk_ck") for k in logger.keys())
    assert len(logger.values("afterkernel/ntk/invariance/globalness")) == 2
    for name in ("kernel_heatmap_epoch_1.png", "eigenspectrum_epoch_1.png", "invariance.png", "accuracy.png"):
        assert (tmp_path / "out" / "figures" / name).is_file()
    assert "CK" not in cb.summary_table()
