"""The Lightning internals the callback reads, in one place: the fit loop's progress counters and the validation
dataloaders given to ``fit`` (``_data_source``). A Lightning release that moves them breaks only this module."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl


def batches_completed(trainer: pl.Trainer) -> int:
    """Training batches completed in the current epoch."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed


def at_epoch_boundary(trainer: pl.Trainer) -> bool:
    """Whether the weights are those after ``trainer.current_epoch`` whole epochs: yes on a fresh start and after a
    checkpoint of a finished epoch; no after a mid-epoch checkpoint, or one saved after an epoch's last batch but
    before its end hooks (Lightning then runs ``on_train_epoch_end`` first)."""
    epochs = trainer.fit_loop.epoch_progress.current
    return epochs.started == epochs.completed or batches_completed(trainer) == 0


def fit_val_loader(trainer: pl.Trainer) -> Any:
    """The first validation dataloader of fit (given to ``fit()`` or the model's hook), even when Lightning runs no
    validation (``limit_val_batches=0``, no ``validation_step``); None when there is none."""
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    if source.instance is None or not source.is_defined():
        return None
    loaders = source.dataloader()
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return loaders
