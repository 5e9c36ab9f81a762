"""How the callback reads the Trainer, in one place: the fit loop's progress counters and the validation dataloaders
given to ``fit`` (``_data_source``), which are Lightning internals (a release that moves them breaks only this
module), when the fit ends, and the DDP shard of the NTK."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch


def batches_completed(trainer: pl.Trainer) -> int:
    """Training batches completed in the current epoch."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed


def epochs_trained(trainer: pl.Trainer) -> tuple[int | float, bool]:
    """Epochs of training behind the weights at an epoch's end (Lightning also ends an epoch that ``max_steps`` cut
    short) or at a checkpoint, and whether the current epoch is partial: ``current_epoch + 1`` after its last batch,
    else fractional, with enough decimals that no partial epoch rounds to a whole one (1999 / 2000 is not 1.0)."""
    seen, total = batches_completed(trainer), trainer.num_training_batches
    if math.isfinite(total) and 0 < total and seen < total:
        digits = max(3, math.ceil(math.log10(total)))
        return round(trainer.current_epoch + seen / total, digits), True
    return trainer.current_epoch + 1, False


def fit_ends_here(trainer: pl.Trainer) -> bool:
    """Whether the fit stops at the current weights, as far as can be told when a checkpoint is saved: a stop was
    asked for (e.g. by early stopping), ``max_steps`` is reached, or the last batch of the last epoch has run."""
    if trainer.should_stop:
        return True
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    epochs, partial = epochs_trained(trainer)
    return not partial and trainer.max_epochs not in (None, -1) and epochs >= trainer.max_epochs


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


def ntk_shard(trainer: pl.Trainer) -> tuple[int, int] | None:
    """``(rank, world_size)`` when the NTK is shared out among DDP ranks, else None."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        return trainer.global_rank, trainer.world_size
    return None
