"""Run by the DDP tests: a CPU (gloo) fit with AfterKernelCallback, in float64, on ``DEVICES`` processes
(n_train=300 > the engine's 256-row strips, so the ranks have work to share).

Usage: python ddp_fit_script.py OUT_DIR [DEVICES [MAX_EPOCHS [resume|checkpoint|3class]]]. The callback writes to
OUT_DIR (kernels saved); every rank writes OUT_DIR/rank<r>.json with the shards it computed (to show that each did
its share), rank 0 also its results and the final weights (OUT_DIR/final.pt). With "checkpoint", a ModelCheckpoint
saves OUT_DIR/ckpt/last.ckpt at validation end (before the callback's epoch-end evaluation); with "resume", the fit
resumes from it. With "3class", the labels are 0, 1, 2 and the model has three logits (the NTK their trace).
"""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_afterkernel.callbacks import AfterKernelCallback, evaluation
from lightning_afterkernel.models import MLPClassifier


def toy_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = 0.6 * torch.rand(400, 1, 8, 8, generator=g)
    x[torch.arange(400) % 2 == 1, :, :4] += 0.4
    return x


def main(out: Path, devices: int = 2, max_epochs: int = 2, mode: str = "") -> AfterKernelCallback:
    calls = []
    engine = evaluation.empirical_ntk_train_test

    def recording(*args, **kwargs):
        k_train, k_test = engine(*args, **kwargs)
        computed = int((k_train != 0).sum() + (k_test != 0).sum())
        calls.append({"shard": kwargs.get("shard"), "nonzero": computed, "total": k_train.numel() + k_test.numel()})
        return k_train, k_test

    evaluation.empirical_ntk_train_test = recording
    try:
        pl.seed_everything(0)
        classes = 3 if mode == "3class" else 2
        loader = DataLoader(TensorDataset(toy_inputs(), torch.arange(400) % classes), batch_size=50)
        resuming = mode in ("resume", "checkpoint")
        callback = AfterKernelCallback(
            epochs=[0, 1, 2] if resuming else [0, 1],
            at_end=not resuming,
            n_train=300,
            n_test=40,
            n_invariance=8,
            verbose=False,
            dtype="float64",
            save_kernels=True,
            dirpath=str(out),
        )
        checkpoint = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_on_train_epoch_end=False)
        trainer = pl.Trainer(
            strategy="ddp" if devices > 1 else "auto",
            devices=devices,
            accelerator="cpu",
            max_epochs=max_epochs,
            callbacks=[callback] + ([checkpoint] if mode == "checkpoint" else []),
            logger=False,
            enable_checkpointing=mode == "checkpoint",
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out,
        )
        model = MLPClassifier(input_shape=(1, 8, 8), width=16, num_classes=1 if classes == 2 else classes)
        trainer.fit(model, loader, loader, ckpt_path=str(out / "ckpt" / "last.ckpt") if mode == "resume" else None)
    finally:
        evaluation.empirical_ntk_train_test = engine
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"calls": calls, "done": callback.done_epochs}))
    if trainer.is_global_zero:
        torch.save(model.state_dict(), out / "final.pt")
        (out / "results.json").write_text(json.dumps(callback.results))
    return callback


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0]), *(int(a) for a in args[1:3]), *args[3:4])
