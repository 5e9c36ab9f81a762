"""Where an evaluation's results go besides the run record: the Trainer's loggers (metrics, the W&B table and
images) and the PNG figures. Global rank 0 calls these."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from lightning_afterkernel.callbacks import _figures
from lightning_afterkernel.callbacks.rows import ResultRow, logged_metrics

FIGURES_DIRNAME = "figures"


def default_folder(trainer: pl.Trainer) -> Path:
    """The Trainer's log dir; for W&B (whose save_dir all runs share) a folder per run id."""
    root = Path(trainer.log_dir or trainer.default_root_dir)
    if isinstance(trainer.logger, WandbLogger):
        return root / "afterkernel" / str(trainer.logger.version)
    return root


def class_names(datamodule: Any) -> dict[int, str]:
    """Label -> class name for the figures, from the datamodule: a ``BinaryPairDataModule``'s ``"3 (y=0)"`` and
    ``"8 (y=1)"`` (its class ids), else its ``class_names`` in label order (``"cat (y=0)"`` for two classes, the
    names alone for more); empty when it says nothing."""
    plus, minus = getattr(datamodule, "plus_class", None), getattr(datamodule, "minus_class", None)
    if None not in (plus, minus):
        return {0: f"{minus} (y=0)", 1: f"{plus} (y=1)"}
    names = getattr(datamodule, "class_names", None)
    if not isinstance(names, list | tuple) or not names:
        return {}
    if len(names) == 2:
        return {label: f"{name} (y={label})" for label, name in enumerate(names)}
    return {label: str(name) for label, name in enumerate(names)}


def log_evaluation(trainer: pl.Trainer, rows: Sequence[ResultRow], prefix: str) -> None:
    """One evaluation's metrics (:func:`~lightning_afterkernel.callbacks.rows.logged_metrics`) to every logger, at
    the global step."""
    metrics = logged_metrics(rows, prefix)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


@rank_zero_only
def log_results_table(trainer: pl.Trainer, results: Sequence[Mapping[str, Any]], prefix: str) -> None:
    """The whole results table, once, for loggers that take tables (W&B)."""
    columns = sorted({key for row in results for key in row})
    data = [[row.get(c, math.nan) for c in columns] for row in results]
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=f"{prefix}/results", columns=columns, data=data)


def draw_figures(
    trainer: pl.Trainer,
    folder: Path,
    prefix: str,
    epoch: float,
    grams: Mapping[str, Tensor],
    spectra: Mapping[str, Mapping[float, Tensor]],
    results: Sequence[Mapping[str, Any]],
    kernels: Sequence[str],
    **options: Any,
) -> None:
    """Redraw the PNGs in ``folder/figures`` after an evaluation (:func:`_figures.evaluation_figures` with
    ``options``) and log them to W&B as ``<prefix>/figures/<name>``; a folder that cannot be written is a warning."""
    where = folder / FIGURES_DIRNAME
    try:
        paths = _figures.evaluation_figures(where, epoch, grams, spectra, results, kernels, **options)
    except OSError as err:
        rank_zero_warn(f"AfterKernelCallback: could not write the figures to {where}: {err}")
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            for key, path in paths.items():
                logger.log_image(key=f"{prefix}/figures/{key}", images=[str(path)], step=trainer.global_step)
