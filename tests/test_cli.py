"""The command line: `python -m lightning_afterkernel fit --config ...` end to end, offline W&B."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import wandb
import yaml

from lightning_afterkernel.callbacks import AfterKernelCallback
from lightning_afterkernel.cli import main
from lightning_afterkernel.data import BinaryPairDataModule, ImageClassDataModule
from lightning_afterkernel.models import MLPClassifier, VGGClassifier

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI(args=...) warns when sys.argv also carries arguments (here: pytest's)."""
    monkeypatch.setattr(sys, "argv", ["lightning_afterkernel"])


def shrunk_quickstart(tmp_path: Path, max_epochs: int = 1) -> Path:
    """The quickstart config with a smaller schedule and every output under tmp_path."""
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg["trainer"]["max_epochs"] = max_epochs
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "run")
    checkpoint, after_kernel = cfg["trainer"]["callbacks"]
    assert checkpoint["class_path"].endswith("ModelCheckpoint") and after_kernel["class_path"].endswith("Callback")
    checkpoint["init_args"]["dirpath"] = str(tmp_path / "run" / "checkpoints")
    after_kernel["init_args"].update({"n_train": 150, "n_test": 100})
    cfg["data"]["train_subset"] = 300
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def after_kernel_callback(cli) -> AfterKernelCallback:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, AfterKernelCallback)]
    return callback


def test_quickstart_config_runs_and_writes_an_offline_wandb_run(tmp_path, capsys):
    cli = main(["fit", "--config", str(shrunk_quickstart(tmp_path))])
    out = capsys.readouterr().out
    assert "After-kernel summary" in out
    assert "NTK SVM" in out and "CK SVM" in out and "network itself" in out
    callback = after_kernel_callback(cli)
    assert callback.done_epochs == [0, 1]
    assert {(r["epoch"], r["kernel"]) for r in callback.results} == {(e, k) for e in (0, 1) for k in ("ntk", "ck")}
    assert all(r["svm_separable"] == 1 and r["svm_test_acc"] > 0.8 for r in callback.results if r["kernel"] == "ntk")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert (tmp_path / "run" / "config.yaml").exists()
    # the model's input shape followed the dataset through the argument link
    assert tuple(cli.model.hparams.input_shape) == (1, 28, 28)


def test_validate_and_test_subcommands_leave_the_callback_idle(tmp_path):
    for subcommand in ("validate", "test"):
        cli = main([subcommand, "--config", str(shrunk_quickstart(tmp_path)), "--trainer.logger=false"])
        metrics = cli.trainer.callback_metrics
        key = "val_acc" if subcommand == "validate" else "test_acc"
        assert 0.0 <= float(metrics[key]) <= 1.0
        assert after_kernel_callback(cli).results == []  # kernels are a fit-time analysis


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses_and_builds(config, tmp_path):
    cli = main(["--config", str(config), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"], run=False)
    n = cli.model.num_parameters()
    assert 90_000 <= n <= 102_000  # the paper's 1e5 budget
    expected = (3, 32, 32) if "cifar10" in config.stem else (1, 28, 28)
    assert tuple(cli.model.hparams.input_shape) == expected


def test_module_entry_point_prints_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_afterkernel", "fit", "--config", "configs/mnist_vgg.yaml", "--print_config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["class_path"] == "lightning_afterkernel.models.VGGClassifier"
    assert printed["data"]["class_path"] == "lightning_afterkernel.data.BinaryPairDataModule"
    assert printed["data"]["init_args"]["dataset"] == "mnist"
    saved = tmp_path / "printed.yaml"  # the printed (and saved) config is itself a valid config, `fit`'s keys aside
    saved.write_text(yaml.safe_dump({k: v for k, v in printed.items() if k not in ("ckpt_path", "weights_only")}))
    cli = main(["--config", str(saved), "--trainer.logger=false"], run=False)
    assert isinstance(cli.model, VGGClassifier) and cli.datamodule.hparams["root"] == "data"


def test_bad_dataset_on_the_command_line_fails_clearly(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_afterkernel",
            "fit",
            "--config",
            "configs/quickstart.yaml",
            "--data.dataset=svhn",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "svhn" in result.stderr and "mnist" in result.stderr


def test_reproduce_and_report_subcommands_have_help(capsys):
    from lightning_afterkernel.__main__ import run

    for command in ("reproduce", "report"):
        with pytest.raises(SystemExit) as exc:
            run([command, "--help"])
        assert exc.value.code == 0
        assert f"python -m lightning_afterkernel {command}" in capsys.readouterr().out


def test_top_level_help_lists_reproduce_and_report_beside_fit():
    out = subprocess.run(
        [sys.executable, "-m", "lightning_afterkernel", "--help"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    assert "reproduce" in out and "report" in out and "{fit,validate,test,predict}" in out


def test_ckpt_path_last_resumes_a_config_run_in_a_new_wandb_folder(tmp_path):
    """The documented CLI resume: every config has a ModelCheckpoint with a fixed folder and save_last, so
    `--ckpt_path last` finds the latest run's checkpoint; the resumed run (a new W&B run id, hence a new results
    folder) carries every earlier row over, the at_end row of the first run (same weights) included."""
    first = main(["fit", "--config", str(shrunk_quickstart(tmp_path, max_epochs=2))])
    before = after_kernel_callback(first)
    assert before.done_epochs == [0, 1, 2]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    wandb.finish()  # as a second process would: a new W&B run
    second = main(["fit", "--config", str(shrunk_quickstart(tmp_path, max_epochs=3)), "--ckpt_path", "last"])
    after = after_kernel_callback(second)
    assert second.trainer.global_step > first.trainer.global_step > 0
    assert after._dir != before._dir
    assert after.done_epochs == [0, 1, 2, 3]
    assert [r["svm_test_acc"] for r in after.results[: len(before.results)]] == [
        r["svm_test_acc"] for r in before.results
    ]
    saved = yaml.safe_load((after._dir / "afterkernel_results.json").read_text())["results"]
    assert sorted({r["epoch"] for r in saved}) == [0, 1, 2, 3]


def test_enable_checkpointing_false_drops_the_configs_checkpoint_callback(tmp_path):
    """Lightning refuses a ModelCheckpoint beside enable_checkpointing=False; the configs keep one (for
    `--ckpt_path last`), so the CLI drops it rather than making the flag unusable with every config."""
    cli = main(
        ["fit", "--config", str(shrunk_quickstart(tmp_path)), "--trainer.logger=false"]
        + ["--trainer.enable_checkpointing=false", "--trainer.limit_train_batches=2"]
    )
    assert cli.trainer.checkpoint_callbacks == []
    assert after_kernel_callback(cli).done_epochs == [0, 1]
    assert not (tmp_path / "run" / "checkpoints").exists()


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_afterkernel", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def assert_cause_first(stderr: str, cause: str) -> None:
    """Not after LightningCLI's usage of every option (60+ lines): a one-line usage, the tip, then the cause."""
    lines = stderr.splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert at <= 3 and cause in "\n".join(lines[at:])
    assert lines[0] == "usage: python -m lightning_afterkernel fit [-c CONFIG] [options]"
    assert "python -m lightning_afterkernel fit --help" in stderr


def test_a_parse_error_prints_its_cause_first():
    result = run_module("fit", "--config", "configs/quickstart.yaml", "--trainer.bogus", "3")
    assert result.returncode == 2
    assert_cause_first(result.stderr, "unrecognized arguments: --trainer.bogus 3")


def test_a_model_that_is_no_lightning_module_is_a_parse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "configs/quickstart.yaml", "--model", "torch.nn.Linear"])
    assert exc.value.code == 2
    assert_cause_first(capsys.readouterr().err, "does not correspond to a subclass of LightningModule")


USER_MODULES = '''
import pytorch_lightning as pl
import torch


class OneLogitNet(pl.LightningModule):
    """A user's own model: no input_shape argument, no features method."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(784, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(self(x), y.float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class PlainData(pl.LightningDataModule):
    """A user's own data module, without input_shape."""

    def train_dataloader(self):
        x, y = torch.rand(64, 1, 28, 28), torch.arange(64) % 2
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
'''


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    (tmp_path / "user_modules.py").write_text(USER_MODULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_modules"


def test_any_lightning_module_as_model(tmp_path, user_modules):
    """A user's one-logit LightningModule without input_shape: the link is skipped, the callback evaluates it."""
    cli = main(
        ["fit", "--config", str(shrunk_quickstart(tmp_path)), "--trainer.logger=false"]
        + ["--model", f"{user_modules}.OneLogitNet", "--model.hidden", "12"]
    )
    assert type(cli.model).__name__ == "OneLogitNet" and cli.model.net[1].out_features == 12
    callback = after_kernel_callback(cli)
    assert callback.done_epochs == [0, 1]
    ntk = [r for r in callback.results if r["kernel"] == "ntk"]
    assert [r["epoch"] for r in ntk] == [0, 1] and all(0.5 < r["svm_test_acc"] <= 1 for r in ntk)


def test_a_data_module_without_input_shape_leaves_the_models(tmp_path, user_modules):
    cli = main(
        ["--config", str(shrunk_quickstart(tmp_path)), "--trainer.logger=false"]
        + ["--data", f"{user_modules}.PlainData", "--model.init_args.input_shape", "[3, 28, 28]"],
        run=False,
    )
    assert type(cli.datamodule).__name__ == "PlainData"
    assert isinstance(cli.model, MLPClassifier) and tuple(cli.model.hparams.input_shape) == (3, 28, 28)


def test_image_class_data_module_as_data(tmp_path):
    """ImageClassDataModule by class path: its options, the input_shape link; the 3-vs-8 task fits end to end."""
    base = ["--config", str(shrunk_quickstart(tmp_path)), "--trainer.logger=false"]
    data = ["--data", "lightning_afterkernel.data.ImageClassDataModule"]
    ten = main(
        [*base, *data, "--data.dataset", "cifar10", "--data.root", "x", "--model.init_args.num_classes", "10"],
        run=False,
    )
    assert isinstance(ten.datamodule, ImageClassDataModule) and ten.datamodule.num_classes == 10
    assert tuple(ten.model.hparams.input_shape) == (3, 32, 32) and ten.model.head.out_features == 10
    assert ten.datamodule.hparams["train_subset"] == 300  # the config's options carried over to the new class

    cli = main(["fit", *base, *data, "--data.classes", "[8, 3]"])
    assert isinstance(cli.datamodule, ImageClassDataModule) and not isinstance(cli.datamodule, BinaryPairDataModule)
    assert cli.datamodule.classes == [8, 3] and cli.datamodule.class_names == ["8", "3"]
    callback = after_kernel_callback(cli)
    assert callback.done_epochs == [0, 1]
    assert all(r["svm_test_acc"] > 0.8 for r in callback.results if r["kernel"] == "ntk")
    assert 0.0 <= float(cli.trainer.callback_metrics["val_acc"]) <= 1.0


TEN_CLASS_CONFIGS = ["mnist10_quick", "mnist10_vgg", "cifar10_10class_vgg"]


@pytest.mark.parametrize("name", TEN_CLASS_CONFIGS)
def test_the_ten_class_configs_take_every_class_with_ten_logits(name, tmp_path):
    """Parsed and instantiated, not run (cifar10_10class_vgg needs torchvision's CIFAR-10 download)."""
    cli = main(["--config", str(REPO / "configs" / f"{name}.yaml"), "--trainer.logger=false"], run=False)
    assert type(cli.datamodule) is ImageClassDataModule and cli.datamodule.classes == list(range(10))
    assert cli.datamodule.dataset == ("cifar10" if name.startswith("cifar") else "mnist")
    whole = name.endswith("_vgg")  # the paper-scale configs train on the whole splits
    assert (cli.datamodule.train_subset, cli.datamodule.test_subset) == ((None, None) if whole else (2000, 1000))
    assert isinstance(cli.model, VGGClassifier if whole else MLPClassifier) and cli.model.head.out_features == 10
    callback = after_kernel_callback(cli)
    assert callback.ntk_outputs == "trace" and callback.kernels == ["ntk", "ck"]
    (checkpoint,) = cli.trainer.checkpoint_callbacks
    assert Path(checkpoint.dirpath).parts[-3:] == ("runs", name, "checkpoints") and checkpoint.save_last


@pytest.mark.real_data
def test_the_quick_ten_class_config_runs_on_real_mnist(tmp_path, shared_data, capsys):
    cfg = yaml.safe_load((REPO / "configs" / "mnist10_quick.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "run")
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "run" / "checkpoints")
    cfg["data"]["init_args"].update(root=str(shared_data), download=False)
    path = tmp_path / "mnist10_quick.yaml"
    path.write_text(yaml.safe_dump(cfg))
    wandb.finish()  # a W&B run an earlier test left open would be taken over instead of a new offline run
    try:
        cli = main(["fit", "--config", str(path), "--trainer.max_epochs", "1"])
    finally:
        wandb.finish()
    out = capsys.readouterr().out
    assert "(SVM trained on 1000; 10 classes, one-vs-rest)" in out and "network itself" in out
    callback = after_kernel_callback(cli)
    assert callback.done_epochs == [0, 1]
    assert all(r["svm_test_acc"] >= 0.8 for r in callback.results if r["kernel"] == "ntk")
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb"))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
