"""``python -m lightning_afterkernel {fit,validate,test,predict} --config configs/<name>.yaml``.

A thin :class:`~pytorch_lightning.cli.LightningCLI`: the model is any
:class:`~lightning_afterkernel.models.BinaryClassifier` subclass (``class_path`` in the YAML), the data
is :class:`~lightning_afterkernel.data.BinaryPairDataModule`, and the model's ``input_shape`` follows
the dataset automatically.
"""

from __future__ import annotations

import importlib

from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_afterkernel.data import BinaryPairDataModule
from lightning_afterkernel.models import BinaryClassifier


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


class AfterKernelCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
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
        BinaryClassifier,
        BinaryPairDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
