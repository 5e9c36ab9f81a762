"""Run by test_ddp_two_processes: a 2-process CPU (gloo) DDP fit with AfterKernelCallback defaults.

Usage: python ddp_fit_script.py OUT_DIR. Rank 0 writes OUT_DIR/rank0.json with the callback's results.
"""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_afterkernel.callbacks import AfterKernelCallback
from lightning_afterkernel.models import MLPClassifier


def main(out: Path) -> None:
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 2
    x = 0.6 * torch.rand(96, 1, 8, 8, generator=g)
    x[y == 1, :, :4] += 0.4
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    callback = AfterKernelCallback(epochs=[0, 1], n_train=40, n_test=24, verbose=False)  # dirpath=None
    trainer = pl.Trainer(
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        max_epochs=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(MLPClassifier(input_shape=(1, 8, 8), width=64), loader, loader)
    if trainer.is_global_zero:
        (out / "rank0.json").write_text(json.dumps({"done": callback.done_epochs, "n": len(callback.results)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
