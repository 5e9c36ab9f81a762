"""The paper's full-scale run through a plain Trainer with ``AfterKernelCallback``, timed per stage.

The setting of ``configs/mnist_vgg.yaml`` / ``configs/mnist_mlp.yaml`` (the paper network on the full MNIST
3-vs-8 split, plain SGD lr 0.01, batch 32; NTK and CK on all 11,982 training and 1,984 test images at epoch 0
and after each scheduled epoch; invariance scores on 1,000 images; figures) without the W&B logger, so that it
runs where wandb and jsonargparse are not installed (the GPU machines). Prints the wall time of the whole fit,
each evaluation's kernel, SVM and analysis times, and the accuracies.

    python benchmarks/full_run.py --model vgg --accelerator gpu --data ../shared/data
    python benchmarks/full_run.py --model mlp --accelerator cpu --epochs 1 --data ../shared/data
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pytorch_lightning as pl
import torch

from lightning_afterkernel.callbacks import AfterKernelCallback
from lightning_afterkernel.data import BinaryPairDataModule
from lightning_afterkernel.models import MLPClassifier, VGGClassifier

MODELS = {"vgg": VGGClassifier, "mlp": MLPClassifier}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="vgg")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (kernels at 0 and at each)")
    parser.add_argument("--data", default=os.environ.get("AFTERKERNEL_DATA", "../shared/data"))
    parser.add_argument("--n-train", type=int, default=11_982, help="kernel train subset (default: all)")
    parser.add_argument("--n-test", type=int, default=1_984, help="kernel test subset (default: all)")
    parser.add_argument("--n-invariance", type=int, default=1000)
    parser.add_argument("--out", default="", help="folder for the results file and figures (default: temporary)")
    args = parser.parse_args()

    pl.seed_everything(0)
    out = args.out or tempfile.mkdtemp(prefix="afterkernel_full_run_")
    dm = BinaryPairDataModule(root=args.data, download=False, batch_size=32)
    callback = AfterKernelCallback(
        epochs=list(range(args.epochs + 1)),
        n_train=args.n_train,
        n_test=args.n_test,
        n_invariance=args.n_invariance,
        dirpath=out,
        progress=False,
        verbose=True,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    device = trainer.strategy.root_device
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    start = time.perf_counter()
    trainer.fit(MODELS[args.model](input_shape=(1, 28, 28)), datamodule=dm)
    wall = time.perf_counter() - start
    print(
        f"\n{args.model.upper()} on MNIST 3-vs-8, kernels on {args.n_train:,} train x {args.n_test:,} test images, "
        f"{args.epochs} epoch(s), {card}: whole fit {wall:.1f} s"
    )
    header = ("epoch", "kernel", "kernel s", "SVM s", "analyses s", "SVM acc", "SVs", "net acc")
    print("{:>5} {:>6} {:>9} {:>7} {:>11} {:>8} {:>6} {:>8}".format(*header))
    for r in callback.results:
        acc = r["svm_test_acc"] if r["svm_separable"] else r["svm_soft_test_acc"]
        print(
            f"{r['epoch']:>5} {r['kernel']:>6} {r['kernel_time_s']:9.2f} {r['svm_time_s']:7.2f} "
            f"{r['analysis_time_s']:11.2f} {acc:8.4f} {r['svm_n_support']:>6} {r['network_test_acc']:8.4f}"
            + ("" if r["svm_separable"] else "  (no hard margin: soft-margin C=1)")
        )
    print(f"results and figures: {out}")


if __name__ == "__main__":
    main()
