"""AfterKernelCallback on models with k logits: the checks at fit start, the NTK of ``ntk_outputs``, one-vs-rest
SVMs, argmax accuracy, centred one-hot alignment, figures, logs, resume; and one-logit runs left bit for bit."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_afterkernel.callbacks import AfterKernelCallback
from lightning_afterkernel.callbacks.evaluation import network_accuracy
from lightning_afterkernel.callbacks.outputs import class_names
from lightning_afterkernel.data import BinaryPairDataModule, ImageClassDataModule
from lightning_afterkernel.errors import ConfigurationError, DataError, ModelError
from lightning_afterkernel.invariance import invariance_scores
from lightning_afterkernel.kernels import empirical_ntk_train_test, kernel_target_alignment
from lightning_afterkernel.models import MLPClassifier
from lightning_afterkernel.svm import HardMarginSVM

DATA = Path(__file__).with_name("data")
SHAPE = (1, 8, 8)
K = 3


def class_data(n: int, seed: int, classes: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 images of ``classes`` classes: class c is brighter in rows 2c and 2c + 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.6 * torch.rand(n, *SHAPE, generator=g)
    for c in range(classes):
        x[y == c, :, 2 * c : 2 * c + 2] += 0.4
    return x, y


class ClassData(pl.LightningDataModule):
    def __init__(self, n_train: int = 96, n_test: int = 48, classes: int = K) -> None:
        super().__init__()
        self.x_train, self.y_train = class_data(n_train, 0, classes)
        self.x_test, self.y_test = class_data(n_test, 1, classes)
        self.class_names = [f"c{c}" for c in range(classes)]

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=16, shuffle=True)


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    name, version = "memory", 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))


class Steps(pl.Callback):
    """Counts the training batches that started."""

    batches = 0

    def on_train_batch_start(self, *args) -> None:
        self.batches += 1


class Grid(pl.LightningModule):
    """A user's model with a (n, 3, 2) output: no logits the kernels can use."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))

    def forward(self, x):
        return self.net(x).reshape(len(x), 3, 2)

    def features(self, x):
        return x.flatten(1)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_trainer(tmp_path, callbacks, max_epochs=2, logger=None) -> pl.Trainer:
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


def mlp(classes: int = K) -> MLPClassifier:
    return MLPClassifier(input_shape=SHAPE, width=64, num_classes=classes, lr=0.1)


def callback(**kwargs) -> AfterKernelCallback:
    options = {"epochs": [0, 1], "n_train": 60, "n_test": 30, "n_invariance": 8, "verbose": False, "figures": False}
    return AfterKernelCallback(**{**options, **kwargs})


# ---------------------------------------------------------------- one logit: as before, bit for bit
def _close(now, before, rel: float, where: str = "") -> None:
    """``now`` equals ``before`` in structure and every non-float; floats within ``rel`` (NaN equals NaN)."""
    if isinstance(before, float) or isinstance(now, float):
        if not (math.isnan(before) and math.isnan(now)):
            assert abs(now - before) <= rel * abs(before), (where, now, before)
    elif isinstance(before, dict):
        assert now.keys() == before.keys(), where
        for key in before:
            _close(now[key], before[key], rel, f"{where}/{key}")
    elif isinstance(before, list):
        assert len(now) == len(before), where
        for i, (a, b) in enumerate(zip(now, before, strict=True)):
            _close(a, b, rel, f"{where}[{i}]")
    else:
        assert now == before, (where, now, before)


def test_a_one_logit_run_is_what_it_was_before_multi_class_models_bit_for_bit(tmp_path):
    """The rows, logged metrics, results file, files written, saved kernels and summary table of one-logit MLP and VGG
    runs equal those the code of commit 29f5081 wrote (data/one_logit_fingerprint.py says how): the MLP's bit for
    bit. The VGG's NTK changed its float32 rounding since (b544c38 took the convolutions' input gradients back
    from NNPACK to oneDNN: 1.3e-7 relative at most in its rows), so its saved NTK files' hashes differ and its
    floats agree to 1e-6 relative; everything else (CK files, labels, files written, summary table) bit for bit."""
    spec = importlib.util.spec_from_file_location("one_logit_fingerprint", DATA / "one_logit_fingerprint.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    before = json.loads(maker.OUT.read_text())
    now = json.loads(json.dumps(maker.fingerprint(tmp_path)))
    assert now["mlp"] == before["mlp"]
    vgg_now, vgg_before = now["vgg"], before["vgg"]
    assert vgg_now["kernels"].keys() == vgg_before["kernels"].keys()
    for name, hashes in vgg_before["kernels"].items():
        assert vgg_now["kernels"][name].keys() == hashes.keys(), name
        for key, digest in hashes.items():
            if not (name.endswith("_ntk.pt") and key.startswith("k_")):
                assert vgg_now["kernels"][name][key] == digest, (name, key)
    for part in ("rows", "logged", "results_file", "files", "summary"):
        _close(vgg_now[part], vgg_before[part], rel=1e-6, where=part)


# ---------------------------------------------------------------- arguments and the checks at fit start
@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("full", "the SVMs and kernel metrics need one value per pair: use 'trace'"),
        ("sum", r"ntk_outputs='sum' must be 'trace'"),
        (-1, r"ntk_outputs=-1 must be 'trace'.*or an int c >= 0"),
        (True, r"ntk_outputs=True must be"),
    ],
)
def test_ntk_outputs_is_checked_at_construction(value, match):
    with pytest.raises(ConfigurationError, match=match):
        AfterKernelCallback(ntk_outputs=value)
    assert AfterKernelCallback(ntk_outputs=2).ntk_outputs == 2


def test_the_model_check_returns_the_logits_and_refuses_what_cannot_be_judged():
    from lightning_afterkernel.callbacks._checks import check_model_and_labels
    from lightning_afterkernel.callbacks.evaluation import Subsets

    x, y = class_data(12, 0)
    three = Subsets(x, y, x, y)
    assert check_model_and_labels(mlp(), three) == K
    assert check_model_and_labels(mlp(2), Subsets(x, y % 2, x, y % 2)) == 2
    assert check_model_and_labels(mlp(1), Subsets(x, y % 2, x, y % 2), ntk_outputs=0) == 1
    with pytest.raises(ConfigurationError, match=r"ntk_outputs=3 is not a logit of MLPClassifier, which has 3"):
        check_model_and_labels(mlp(), three, ntk_outputs=3)
    with pytest.raises(DataError, match=r"the model has 2 logits, so its classes are labelled 0..1.*labels \[2\]"):
        check_model_and_labels(mlp(2), three)
    with pytest.raises(DataError, match=r"One logit serves two classes: .*num_classes=3"):
        check_model_and_labels(mlp(1), three)
    with pytest.raises(DataError, match=r"the test subset holds classes \[2\] that the 8-example train subset lacks"):
        check_model_and_labels(mlp(), Subsets(x[y < 2][:8], y[y < 2][:8], x, y))
    with pytest.raises(DataError, match=r"train subset has labels \[1\]; the SVM needs at least two classes"):
        check_model_and_labels(mlp(), Subsets(x[y == 1], y[y == 1], x[y == 1], y[y == 1]))
    with pytest.raises(DataError, match=r"not whole numbers.*class labels 0..2"):
        check_model_and_labels(mlp(), Subsets(x, y + 0.5, x, y))


@pytest.mark.parametrize("kernels", [["ntk"], ["ck"], ["ntk", "ck"]])
@pytest.mark.parametrize(
    ("model", "options", "error", "match"),
    [
        (lambda: mlp(2), {}, DataError, r"the model has 2 logits.*labels \[2\]"),
        (lambda: mlp(1), {}, DataError, "One logit serves two classes"),
        (lambda: mlp(), {"ntk_outputs": 5}, ConfigurationError, "ntk_outputs=5 is not a logit"),
        (Grid, {}, ModelError, re.escape("Grid returns shape (4, 3, 2) on 4 training examples")),
    ],
)
def test_a_mismatch_is_refused_before_any_training_step(tmp_path, kernels, model, options, error, match):
    steps = Steps()
    cb = callback(epochs=[1], kernels=kernels, **options)
    trainer = make_trainer(tmp_path, [steps, cb], max_epochs=2)
    with pytest.raises(error, match=match):
        trainer.fit(model(), datamodule=ClassData())
    assert steps.batches == 0 and trainer.global_step == 0 and cb.results == []


def test_network_accuracy_is_the_sign_of_one_logit_and_the_argmax_of_k():
    assert network_accuracy(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)
    assert network_accuracy(torch.tensor([0.5, -1.0]), torch.tensor([1, -1])) == 1.0
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 5.0]])
    assert network_accuracy(logits, torch.tensor([1, 0, 2, 2])) == 0.75


def test_the_figures_name_the_classes_as_the_datamodule_does():
    assert class_names(BinaryPairDataModule(root=None)) == {0: "3 (y=0)", 1: "8 (y=1)"}
    cifar = ImageClassDataModule(dataset="cifar10", root="x", classes=[0, 1, 9])
    assert class_names(cifar) == {0: "airplane", 1: "automobile", 2: "truck"}
    assert class_names(ImageClassDataModule(root="x", classes=[8, 3])) == {0: "8 (y=0)", 1: "3 (y=1)"}
    assert class_names(types.SimpleNamespace()) == {} and class_names(None) == {}


# ---------------------------------------------------------------- a k-class fit
@pytest.mark.parametrize("ntk_outputs", ["trace", 1])
def test_a_three_class_fit_evaluates_its_ntk_with_one_vs_rest_svms(tmp_path, ntk_outputs):
    pl.seed_everything(0)
    logger = MemoryLogger()
    cb = callback(ntk_outputs=ntk_outputs, save_kernels=True, figures=True, dirpath=str(tmp_path / "out"))
    model = mlp()
    dm = ClassData()
    make_trainer(tmp_path, [cb], max_epochs=2, logger=logger).fit(model, datamodule=dm)

    assert {(r["epoch"], r["kernel"]) for r in cb.results} == {(e, k) for e in (0, 1, 2) for k in ("ntk", "ck")}
    indices = cb._record.indices
    x_train, y_train = dm.x_train[indices["train"]], dm.y_train[indices["train"]]
    x_test, y_test = dm.x_test[indices["test"]], dm.y_test[indices["test"]]
    final = {r["kernel"]: r for r in cb.results if r["epoch"] == 2}
    # the NTK of ntk_outputs on the final weights: the trace is not logit 1's
    saved = torch.load(tmp_path / "out" / "kernels" / "epoch_2_ntk.pt", weights_only=True)
    k_train, k_test = empirical_ntk_train_test(model, x_train, x_test, outputs=ntk_outputs)
    other, _ = empirical_ntk_train_test(model, x_train, x_test, outputs=1 if ntk_outputs == "trace" else "trace")
    assert torch.allclose(saved["k_train"], k_train, rtol=1e-5) and torch.allclose(saved["k_test"], k_test, rtol=1e-5)
    assert not torch.allclose(saved["k_train"], other, rtol=1e-2)
    for name, row in final.items():  # one-vs-rest SVM, centred one-hot alignment, as the functions give them
        kernel = torch.load(tmp_path / "out" / "kernels" / f"epoch_2_{name}.pt", weights_only=True)
        gram = kernel["k_train"].double()
        svm = HardMarginSVM().fit(gram, y_train)
        assert svm.classes_.tolist() == [0, 1, 2]
        assert row["svm_test_acc"] == svm.score(kernel["k_test"].double(), y_test)
        assert row["svm_n_support"] == svm.n_support_ and row["svm_min_margin"] == pytest.approx(svm.min_margin_)
        assert row["kta"] == pytest.approx(kernel_target_alignment(gram, y_train, num_classes=K), rel=1e-12)
    assert final["ntk"]["svm_test_acc"] > 0.9
    scores = invariance_scores(model, x_test[:8], ["shift", "rotation"], kernel="ntk", outputs=ntk_outputs)
    assert final["ntk"]["invariance_shift"] == pytest.approx(scores["shift"], rel=1e-5)
    assert final["ntk"]["invariance_rotation"] == pytest.approx(scores["rotation"], rel=1e-5)
    with torch.no_grad():
        expected = float((model(x_test).argmax(1) == y_test).double().mean())
    assert final["ntk"]["network_test_acc"] == final["ck"]["network_test_acc"] == expected > 0.5
    assert math.isfinite(final["ntk"]["alignment_to_initial"]) and final["ntk"]["distance_to_initial"] > 0

    header = json.loads((tmp_path / "out" / "afterkernel_results.json").read_text())
    assert header["logits"] == K and header["ntk_outputs"] == ntk_outputs
    assert (tmp_path / "out" / "figures" / "kernel_heatmap_epoch_2.png").is_file()
    table = cb.summary_table()
    assert "(SVM trained on 60; 3 classes, one-vs-rest)" in table and "centred one-hot labels" in table
    assert re.search(r"NTK SVM +\d+\.\d\d% +\d+\.\d\d% +\d+\.\d\d%", table)

    # the same logged keys as a one-logit run of the same callback (the soft-margin accuracy where it ran)
    binary_logger = MemoryLogger()
    binary = ClassData(classes=2)
    make_trainer(tmp_path / "binary", [callback()], max_epochs=2, logger=binary_logger).fit(mlp(1), datamodule=binary)
    assert _keys(logger) == _keys(binary_logger)
    logged = [metrics for _, metrics in logger.rows if "afterkernel/ntk/svm_test_acc" in metrics]
    assert [m["afterkernel/ntk/svm_test_acc"] for m in logged] == [
        r["svm_test_acc"] for r in cb.results if r["kernel"] == "ntk"
    ]


def _keys(logger: MemoryLogger) -> set[str]:
    return {k for _, m in logger.rows for k in m if k.startswith("afterkernel/") and "soft" not in k}


def test_a_resumed_three_class_fit_keeps_its_rows_and_recomputes_the_epoch_0_kernel_of_its_logit(tmp_path):
    """A checkpoint copied to a fresh folder, without the epoch-0 kernel file: the rows come back, and the epoch-0
    kernel recomputed from the checkpoint's weights is the NTK of ntk_outputs=1, as the first fit's was."""
    pl.seed_everything(0)
    first = callback(ntk_outputs=1, save_kernels=True, dirpath=str(tmp_path / "first"))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [checkpoint, first], max_epochs=1).fit(mlp(), datamodule=ClassData())
    assert first.done_epochs == [0, 1]
    moved = tmp_path / "moved.ckpt"
    shutil.copyfile(tmp_path / "ckpt" / "last.ckpt", moved)
    (tmp_path / "first" / "afterkernel_initial_kernels.pt").unlink()

    second = callback(epochs=[0, 1, 2], ntk_outputs=1, dirpath=str(tmp_path / "second"))
    with pytest.warns(UserWarning, match="recomputing the epoch-0"):
        make_trainer(tmp_path, [second], max_epochs=2).fit(mlp(), datamodule=ClassData(), ckpt_path=moved)
    assert second.done_epochs == [0, 1, 2]
    assert json.dumps(second.results[: len(first.results)]) == json.dumps(first.results)  # (NaN included)
    recomputed = torch.load(tmp_path / "second" / "afterkernel_initial_kernels.pt", weights_only=True)["ntk"]
    original = torch.load(tmp_path / "first" / "kernels" / "epoch_0_ntk.pt", weights_only=True)["k_train"]
    assert torch.allclose(recomputed, original, rtol=1e-5, atol=1e-6)
    row = [r for r in second.results if r["epoch"] == 2 and r["kernel"] == "ntk"][0]
    assert 0 < row["alignment_to_initial"] < 1
    assert second.state_key != callback().state_key  # ntk_outputs=1 is another kernel: another state


def test_ddp_two_processes_share_the_trace_ntk_of_a_three_class_model(tmp_path):
    """2-process gloo DDP on a 3-logit model: both ranks compute a share of the trace NTK, the epoch-0 rows equal a
    single process's and the final kernel equals the single-process trace kernel on the final weights."""
    spec = importlib.util.spec_from_file_location("ddp_fit_script", Path(__file__).with_name("ddp_fit_script.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    single.mkdir()
    command = [sys.executable, spec.origin, str(ddp), "2", "2", "3class"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ddp)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        calls = json.loads((ddp / f"rank{rank}.json").read_text())["calls"]
        assert [c["shard"] for c in calls] == [[rank, 2]] * 3 and all(0 < c["nonzero"] < c["total"] for c in calls)
    reference = script.main(single, devices=1, mode="3class")
    ours = json.loads((ddp / "results.json").read_text())
    assert all(r["svm_separable"] == 1 for r in ours if r["kernel"] == "ntk")  # (the CK's 16 features are not)
    assert json.loads((ddp / "afterkernel_results.json").read_text())["logits"] == 3
    for row, theirs in zip(ours[:2], reference.results[:2], strict=True):
        assert row["epoch"] == 0 and row["kernel"] == theirs["kernel"]
        comparable = [k for k, v in row.items() if not k.endswith("_time_s") and not isinstance(v, str)]
        assert [row[k] for k in comparable] == pytest.approx([theirs[k] for k in comparable], rel=1e-6, nan_ok=True)
    model = MLPClassifier(input_shape=SHAPE, width=16, num_classes=3)
    model.load_state_dict(torch.load(ddp / "final.pt", weights_only=True))
    saved = torch.load(ddp / "kernels" / "epoch_2_ntk.pt", weights_only=True)
    x = script.toy_inputs()
    k_train, _ = empirical_ntk_train_test(
        model, x[saved["train_indices"]], x[saved["test_indices"]], dtype=torch.float64
    )
    assert float((saved["k_train"] - k_train).norm() / k_train.norm()) <= 1e-6


# ---------------------------------------------------------------- real MNIST, ten classes
@pytest.mark.real_data
def test_ten_class_mnist_in_a_plain_trainer_with_offline_wandb(tmp_path, shared_data, monkeypatch, capsys):
    """The project's model and data module in a plain Trainer: the NTK SVM of the 10-class MLP trained on 1,000
    MNIST training images is at least 80% accurate on its 500-image test subset, and W&B gets the one-logit keys."""
    sent: list[dict[str, float]] = []
    log_metrics = WandbLogger.log_metrics

    def spy(self, metrics, step=None):
        sent.append(dict(metrics))
        return log_metrics(self, metrics, step)

    monkeypatch.setattr(WandbLogger, "log_metrics", spy)
    pl.seed_everything(0)
    dm = ImageClassDataModule(dataset="mnist", root=str(shared_data), train_subset=1000, test_subset=500)
    cb = AfterKernelCallback(epochs=[0], n_train=1000, n_test=500, n_invariance=50, figures=False)
    logger = WandbLogger(project="afterkernel-tests", save_dir=str(tmp_path), offline=True)
    try:
        make_trainer(tmp_path, [cb], max_epochs=2, logger=logger).fit(MLPClassifier(num_classes=10), datamodule=dm)
    finally:
        wandb.finish()  # (a W&B run left open is taken over by the next WandbLogger, in other tests)

    ntk = [r for r in cb.results if r["kernel"] == "ntk"]
    assert [r["epoch"] for r in ntk] == [0, 2]
    assert all(r["svm_separable"] == 1 and r["svm_test_acc"] >= 0.8 for r in ntk), [r["svm_test_acc"] for r in ntk]
    out = capsys.readouterr().out
    assert "(SVM trained on 1000; 10 classes, one-vs-rest)" in out
    assert re.search(r"NTK SVM +\d\d\.\d\d% +\d\d\.\d\d%", out) and "CK SVM" in out
    keys = {k for m in sent for k in m if k.startswith("afterkernel/")}
    assert {"afterkernel/ntk/svm_test_acc", "afterkernel/ck/svm_test_acc", "afterkernel/network_test_acc"} <= keys
    assert {"afterkernel/ntk/kta", "afterkernel/ntk/invariance/shift", "afterkernel/alignment_ntk_ck"} <= keys
    assert [m["afterkernel/ntk/svm_test_acc"] for m in sent if "afterkernel/ntk/svm_test_acc" in m] == [
        r["svm_test_acc"] for r in ntk
    ]
    assert list(tmp_path.glob("wandb/offline-run-*/*.wandb"))
