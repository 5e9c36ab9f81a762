"""``python -m lightning_afterkernel {fit,validate,test,predict} --config configs/<name>.yaml``.

A thin :class:`~pytorch_lightning.cli.LightningCLI`. The model is any ``LightningModule`` class path (the configs
use :class:`~lightning_afterkernel.models.VGGClassifier` and :class:`~lightning_afterkernel.models.MLPClassifier`;
the callback needs one logit per example, or k logits with labels 0..k-1), the data any ``LightningDataModule``
class path, by default
:class:`~lightning_afterkernel.data.BinaryPairDataModule` (whose options a config may give without a
``class_path``; :class:`~lightning_afterkernel.data.ImageClassDataModule` serves other classes). When the data module
has an ``input_shape`` and the model an ``input_shape`` argument, the model's follows the data's. A parse error
prints its cause under a one-line usage, not under the 60-line usage of every option.
"""

from __future__ import annotations

import importlib
from typing import IO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

PROG = "python -m lightning_afterkernel"
DEFAULT_DATA = "lightning_afterkernel.data.BinaryPairDataModule"


def _is_checkpoint(callback: object) -> bool:
    """Whether a config's callback entry (a ``class_path`` namespace, or an instance) is a Lightning Checkpoint."""
    class_path = getattr(callback, "class_path", None)
    if class_path is None:
        return isinstance(callback, Checkpoint)
    module, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, Checkpoint)


class AfterKernelArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with a one-line usage, so that a parse error's cause is not buried under the usage."""

    def print_usage(self, file: IO[str] | None = None) -> None:
        self._print_message(f"usage: {self.prog.replace(' [options]', '')} [-c CONFIG] [options]\n", file)


class AfterKernelCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA}})
        # jsonargparse ignores this link when the data object has no input_shape or the model no such argument
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        # The configs keep a ModelCheckpoint (for `--ckpt_path last`); `--trainer.enable_checkpointing false` turns
        # it off, where Lightning would refuse a checkpoint callback beside enable_checkpointing=False.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is not None and trainer.get("enable_checkpointing") is False and trainer.get("callbacks"):
            trainer["callbacks"] = [c for c in trainer["callbacks"] if not _is_checkpoint(c)]


def main(args: list[str] | None = None, run: bool = True) -> AfterKernelCLI:
    """Build and (by default) run the CLI; ``args`` replaces ``sys.argv[1:]`` (for tests and scripts)."""
    return AfterKernelCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=AfterKernelArgumentParser,
        parser_kwargs={"prog": PROG},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
