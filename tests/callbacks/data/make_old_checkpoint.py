"""How ``af988fc_last.ckpt`` was written: the code of ``main`` at commit af988fc (before the callback was split
into modules and before its checkpoint state held the epoch-0 weights), run once from the project root as
``python tests/callbacks/data/make_old_checkpoint.py``. Kept to document the file; rerunning it with later code
writes a checkpoint of that code, not of af988fc.

The fit: a 4-layer MLP of width 8 on 8x8 toy images (the tests' ``toy_data``), 2 epochs of 6 batches,
AfterKernelCallback(epochs=[0, 1], n_train=40, n_test=24, n_invariance=8), ModelCheckpoint(save_last=True). The
checkpoint holds the rows of epochs 0 and 1; the ``at_end`` row (epoch 2) and the side files were written to a
temporary folder that no longer exists, as for a checkpoint copied to another machine.
"""

import shutil
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_afterkernel.callbacks import AfterKernelCallback
from lightning_afterkernel.models import MLPClassifier

SHAPE = (1, 8, 8)
OUT = Path(__file__).with_name("af988fc_last.ckpt")


def toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.6 * torch.rand(n, *SHAPE, generator=g)
    x[y == 1, :, :4] += 0.4
    return x, y


class ToyData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.x_train, self.y_train = toy_data(96, 0)
        self.x_test, self.y_test = toy_data(48, 1)

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=16, shuffle=True)


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="afterkernel-old-ckpt-"))
    try:
        pl.seed_everything(0)
        callback = AfterKernelCallback(
            epochs=[0, 1], n_train=40, n_test=24, n_invariance=8, verbose=False, figures=False, dirpath=str(folder)
        )
        trainer = pl.Trainer(
            max_epochs=2,
            callbacks=[callback, ModelCheckpoint(dirpath=folder / "ckpt", save_last=True)],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=folder,
            accelerator="cpu",
        )
        trainer.fit(MLPClassifier(input_shape=SHAPE, width=8, lr=0.1), datamodule=ToyData())
        shutil.copyfile(folder / "ckpt" / "last.ckpt", OUT)
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
