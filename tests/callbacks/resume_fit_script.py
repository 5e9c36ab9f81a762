"""Run by the kill-and-resume tests: a small single-process fit with checkpoints every epoch.

Usage: python resume_fit_script.py OUT_DIR [resume]. ``resume`` continues from ``ckpt_path="last"``. Environment:
``AFTERKERNEL_TEST_HANG_EPOCH=e`` makes the kernel computation of epoch e write OUT_DIR/hanging and sleep (to be
killed there); ``AFTERKERNEL_TEST_BATCH_SLEEP=s`` sleeps s seconds after every training batch (to be killed
during training).
"""

import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_afterkernel.callbacks import AfterKernelCallback, evaluation
from lightning_afterkernel.models import MLPClassifier


class HangingCallback(AfterKernelCallback):
    def __init__(self, out: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out = out
        self.hang = int(os.environ.get("AFTERKERNEL_TEST_HANG_EPOCH", -1))
        self.batch_sleep = float(os.environ.get("AFTERKERNEL_TEST_BATCH_SLEEP", 0))
        self.now = None
        compute = evaluation.compute_kernel

        def hanging(*args, **kwargs):
            if self.now == self.hang:
                (self.out / "hanging").write_text(str(self.now))
                time.sleep(600)
            return compute(*args, **kwargs)

        evaluation.compute_kernel = hanging  # this script's process only

    def _evaluate(self, trainer, pl_module, epoch=0):
        self.now = epoch
        super()._evaluate(trainer, pl_module, epoch)

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.batch_sleep)


def main(out: Path, resume: bool) -> None:
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 2
    x = 0.6 * torch.rand(96, 1, 8, 8, generator=g)
    x[y == 1, :, :4] += 0.4
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    callback = HangingCallback(
        out,
        epochs=[0, 1, 2, 3],
        at_end=False,
        n_train=40,
        n_test=24,
        n_invariance=8,
        verbose=False,
        figures=False,
        dirpath=str(out / "afterkernel"),
    )
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_epochs=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=4,
        callbacks=[callback, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        deterministic=True,
    )
    trainer.fit(MLPClassifier(input_shape=(1, 8, 8), width=64), loader, loader, ckpt_path="last" if resume else None)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] == ["resume"])
