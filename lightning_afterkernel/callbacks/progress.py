"""The kernel computation's progress display, beside Lightning's progress bar."""

from __future__ import annotations

import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm


class KernelProgress:
    """A progress display for one kernel computation that sits beside Lightning's progress bar: a task
    in :class:`~pytorch_lightning.callbacks.RichProgressBar`'s live display, or a tqdm bar on the line
    below :class:`~pytorch_lightning.callbacks.TQDMProgressBar`'s; nothing when the Trainer shows none.
    Used as ``with KernelProgress(trainer, label, enabled) as progress``, ``progress`` being a callable
    ``(done, total)`` or None."""

    def __init__(self, trainer: pl.Trainer, label: str, *, enabled: bool) -> None:
        self.bar = trainer.progress_bar_callback if enabled else None
        self.label = label
        self._task: Any = None
        self._tqdm: Any = None

    def __enter__(self) -> Any:
        bar = self.bar
        if bar is None or not bar.is_enabled:
            return None
        if isinstance(bar, RichProgressBar):
            return self._rich if bar.progress is not None else None
        if isinstance(bar, TQDMProgressBar):
            return self._tqdm_update
        return None

    def _rich(self, done: int, total: int) -> None:
        progress = self.bar.progress
        if self._task is None:
            self._task = progress.add_task(self.label, total=total)
        progress.update(self._task, completed=done)
        progress.refresh()

    def _tqdm_update(self, done: int, total: int) -> None:
        if self._tqdm is None:
            self._tqdm = Tqdm(
                desc=self.label,
                total=total,
                position=2 * self.bar.process_position + 2,
                leave=False,
                dynamic_ncols=True,
                file=sys.stdout,
            )
        self._tqdm.update(done - self._tqdm.n)

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self.bar.progress.remove_task(self._task)
        if self._tqdm is not None:
            self._tqdm.close()
