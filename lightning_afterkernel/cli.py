"""``python -m lightning_afterkernel {fit,validate,test,predict} --config configs/<name>.yaml``.

A thin :class:`~pytorch_lightning.cli.LightningCLI`: the model is any
:class:`~lightning_afterkernel.models.BinaryClassifier` subclass (``class_path`` in the YAML), the data
is :class:`~lightning_afterkernel.data.BinaryPairDataModule`, and the model's ``input_shape`` follows
the dataset automatically.
"""

from __future__ import annotations

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_afterkernel.data import BinaryPairDataModule
from lightning_afterkernel.models import BinaryClassifier


class AfterKernelCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")


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
