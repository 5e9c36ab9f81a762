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


def test_module_entry_point_prints_config():
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
    assert printed["data"]["dataset"] == "mnist"


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
