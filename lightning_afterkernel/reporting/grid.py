"""The paper grid: {MNIST, CIFAR-10} x {VGG, MLP} x {no augmentation, augmentation} plus the learning-rate study.

Every cell and seed is one Lightning ``fit`` with :class:`~lightning_afterkernel.callbacks.AfterKernelCallback`
(NTK and CK at epoch 0, after ``few_epochs`` and at the end, invariance scores on), summarised in
``<out>/<cell>/seed<k>/cell.json``. A run whose ``cell.json`` is complete is skipped; an unfinished one resumes
from its last epoch checkpoint (``checkpoints/last.ckpt``).

Learning-rate study ("a larger learning rate, trained to the same training loss"): the cell ``<dataset>-<arch>-lr<lr>``
trains with the larger ``lr`` until its epoch-mean training loss is <= the final epoch-mean training loss of the
lr 0.01 cell ``<dataset>-<arch>-noaug`` with the same seed (which is run first), or until ``lr_max_epochs``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_afterkernel.callbacks import AfterKernelCallback
from lightning_afterkernel.callbacks.after_kernel import INVARIANCE_FAMILIES
from lightning_afterkernel.data import BinaryPairDataModule
from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.models import MLPClassifier, VGGClassifier

log = logging.getLogger("lightning_afterkernel.reporting")

CELL_FILENAME = "cell.json"
CELL_FORMAT = 1
DATASETS = ("mnist", "cifar10")
ARCHITECTURES = ("vgg", "mlp")
AUGMENTATIONS = ("noaug", "aug")
PAPER_LR = 0.01
AUGMENTATION = {"rotation_degrees": 15.0, "shift_pixels": 1}
"""The paper's optional augmentation: random rotation +-15 degrees plus a +-1 pixel shift."""


@dataclass(frozen=True)
class Scale:
    """How big every run of the grid is."""

    name: str
    train_subset: int | None  # training images (None: the whole split)
    test_subset: int | None  # test images the network is evaluated on (None: the whole split)
    n_train: int  # kernel/SVM training subset (drawn from the training images)
    n_test: int  # kernel/SVM test subset
    n_invariance: int  # images the invariance scores are averaged over
    max_epochs: int  # epochs of the lr 0.01 runs
    few_epochs: int  # "after a few epochs": the intermediate kernel
    large_lr: float  # the learning-rate study's larger learning rate
    lr_max_epochs: int  # cap of the large-lr run (stops earlier once it reaches the target training loss)
    seeds: int  # default number of seeds


SCALES: dict[str, Scale] = {
    "tiny": Scale("tiny", 256, 128, 96, 96, 16, 2, 1, 0.1, 3, 1),
    "cpu": Scale("cpu", 2000, 1000, 1000, 500, 200, 5, 1, 0.1, 10, 3),
    "full": Scale("full", None, None, 10000, 1984, 1000, 10, 1, 0.1, 40, 3),
}
"""``tiny``: seconds per cell, for tests. ``cpu``: the whole grid in about an hour on 2 CPU cores.
``full``: the paper's setting (whole splits, 10 epochs; kernels on 10,000 training images), for a GPU."""


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid."""

    dataset: str
    arch: str
    augment: bool = False
    lr: float = PAPER_LR

    @property
    def name(self) -> str:
        if self.lr != PAPER_LR:
            return f"{self.dataset}-{self.arch}-lr{self.lr:g}"
        return f"{self.dataset}-{self.arch}-{'aug' if self.augment else 'noaug'}"

    @property
    def reference(self) -> Cell | None:
        """The lr 0.01 cell whose final training loss a learning-rate-study cell trains down to."""
        return Cell(self.dataset, self.arch) if self.lr != PAPER_LR else None


def grid_cells(scale: Scale) -> list[Cell]:
    """Every cell of the grid in run order (each learning-rate cell after its reference)."""
    cells = [Cell(d, a, aug) for d in DATASETS for a in ARCHITECTURES for aug in (False, True)]
    return cells + [Cell(d, a, False, scale.large_lr) for d in DATASETS for a in ARCHITECTURES]


def select_cells(scale: Scale, names: list[str] | None) -> list[Cell]:
    """The cells named (all when ``names`` is empty), plus the references the learning-rate cells need."""
    cells = grid_cells(scale)
    if not names:
        return cells
    by_name = {c.name: c for c in cells}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigurationError(f"--cells {unknown} are not cells of the grid; choose from {list(by_name)}.")
    wanted = {by_name[n] for n in names}
    wanted |= {c.reference for c in wanted if c.reference is not None}
    return [c for c in cells if c in wanted]


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
    return Path(out) / cell.name / f"seed{seed}"


def load_complete(path: Path) -> dict[str, Any] | None:
    """The cell file at ``path`` if it exists, parses and is marked complete, else None."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("complete") is True and data.get("format") == CELL_FORMAT:
        return data
    return None


class TrainLossTracker(pl.Callback):
    """Record the epoch-mean training loss; optionally stop once it is <= ``target``. Resumable."""

    def __init__(self, target: float | None = None) -> None:
        self.target = target
        self.losses: list[float] = []
        self._sum = 0.0
        self._count = 0

    @property
    def state_key(self) -> str:
        return "TrainLossTracker"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sum, self._count = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        n = len(batch[1])
        self._sum += float(loss.detach()) * n
        self._count += n

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._count:
            self.losses.append(self._sum / self._count)
        if self.target is not None and self.losses and self.losses[-1] <= self.target:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = list(state_dict["losses"])


def _error(acc: Any) -> float | None:
    return None if acc is None or (isinstance(acc, float) and math.isnan(acc)) else 1.0 - float(acc)


def _kernel_summary(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "epoch": row["epoch"],
        "svm_test_error": _error(row.get("svm_test_acc")),
        "svm_soft_test_error": _error(row.get("svm_soft_test_acc")),
        "svm_separable": bool(row.get("svm_separable")),
        "network_test_error_kernel_subset": _error(row.get("network_test_acc")),
        "invariance": {f: row.get(f"invariance_{f}") for f in INVARIANCE_FAMILIES},
        "effective_rank": row.get("effective_rank"),
        "alignment_to_initial": row.get("alignment_to_initial"),
        "alignment_ntk_ck": row.get("alignment_ntk_ck"),
        "cka_ntk_ck": row.get("cka_ntk_ck"),
        "kta": row.get("kta"),
    }


def summarise(rows: list[dict[str, Any]], few_epochs: int) -> dict[str, Any]:
    """Per kernel: the ``initial`` (epoch 0), ``few`` (epoch ``few_epochs``, if reached) and ``end`` rows."""
    out: dict[str, Any] = {}
    for kernel in ("ntk", "ck"):
        mine = sorted((r for r in rows if r["kernel"] == kernel), key=lambda r: r["epoch"])
        by_epoch = {r["epoch"]: r for r in mine}
        out[kernel] = {
            "initial": _kernel_summary(by_epoch.get(0)),
            "few": _kernel_summary(by_epoch.get(few_epochs)),
            "end": _kernel_summary(mine[-1] if mine and mine[-1]["epoch"] > 0 else None),
        }
    return out


@torch.no_grad()
def network_test_error(model: pl.LightningModule, dm: BinaryPairDataModule) -> float:
    """Test error of the network itself on the whole (subset) test split."""
    x, y = dm.tensors("test")
    was_training = model.training
    model.eval()
    logits = torch.cat([model(x[i : i + 512].to(model.device)).cpu() for i in range(0, len(x), 512)])
    model.train(was_training)
    return float(((logits > 0).long() != y.long()).double().mean())


def run_one(
    cell: Cell,
    seed: int,
    scale: Scale,
    out: Path,
    data_root: str,
    target_loss: float | None = None,
    accelerator: str = "auto",
) -> dict[str, Any]:
    """Fit one cell with one seed (resuming from ``checkpoints/last.ckpt`` if present) and write its ``cell.json``."""
    rdir = run_dir(out, cell, seed)
    t_start = time.perf_counter()
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = BinaryPairDataModule(
        dataset=cell.dataset,
        root=data_root,
        download=False,
        train_subset=scale.train_subset,
        test_subset=scale.test_subset,
        subset_seed=0,
        **(AUGMENTATION if cell.augment else {}),
    )
    model_cls = VGGClassifier if cell.arch == "vgg" else MLPClassifier
    model = model_cls(input_shape=dm.input_shape, lr=cell.lr)
    max_epochs = scale.lr_max_epochs if cell.reference is not None else scale.max_epochs
    after_kernel = AfterKernelCallback(
        epochs=sorted({0, scale.few_epochs}),
        at_end=True,
        kernels=["ntk", "ck"],
        n_train=scale.n_train,
        n_test=scale.n_test,
        seed=0,
        n_invariance=scale.n_invariance,
        dirpath=str(rdir / "afterkernel"),
        figures=False,
        progress=False,
        verbose=False,
        on_error="warn",
    )
    tracker = TrainLossTracker(target=target_loss)
    ckpt_dir = rdir / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        logger=False,
        callbacks=[after_kernel, tracker, checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(rdir),
    )
    last = ckpt_dir / "last.ckpt"
    resumed = last.exists()
    if resumed:
        log.info("%s seed %d: resuming from %s", cell.name, seed, last)
    t_fit = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=str(last) if resumed else None)
    fit_s = time.perf_counter() - t_fit
    rows = [dict(r) for r in after_kernel.results]
    summary = summarise(rows, scale.few_epochs)
    payload = {
        "format": CELL_FORMAT,
        "complete": True,
        "cell": cell.name,
        "seed": seed,
        "scale": scale.name,
        "config": {
            **asdict(cell),
            "augmentation": AUGMENTATION if cell.augment else None,
            "scale": asdict(scale),
            "max_epochs": max_epochs,
            "target_train_loss": target_loss,
            "model": type(model).__name__,
            "width": getattr(model, "width", None),
            "num_parameters": model.num_parameters(),
            "accelerator": str(trainer.strategy.root_device),
        },
        "epochs_trained": trainer.current_epoch,
        "train_loss_per_epoch": tracker.losses,
        "final_train_loss": tracker.losses[-1] if tracker.losses else None,
        "reached_target_loss": None
        if target_loss is None
        else bool(tracker.losses and tracker.losses[-1] <= target_loss),
        "network_test_error": network_test_error(model, dm),
        "n_test_network": len(dm.tensors("test")[1]),
        "kernels": summary,
        "alignment_ntk_ck": {
            stage: (summary["ntk"][stage] or {}).get("alignment_ntk_ck") for stage in ("initial", "few", "end")
        },
        "timings": {
            "fit_s": fit_s,
            "kernel_s": sum(r.get("kernel_time_s", 0.0) or 0.0 for r in rows),
            "svm_s": sum(r.get("svm_time_s", 0.0) or 0.0 for r in rows),
            "analysis_s": sum(r.get("analysis_time_s", 0.0) or 0.0 for r in rows),
            "total_s": time.perf_counter() - t_start,
            "resumed": resumed,
        },
        "rows": rows,
    }
    _write_json(rdir / CELL_FILENAME, payload)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # keep the committed outputs small: the cell file is the result
    for pt in (rdir / "afterkernel").glob("*.pt"):
        pt.unlink()
    return payload


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, allow_nan=False))
    tmp.replace(path)


def _finite(value: Any) -> Any:
    """Strict JSON: NaN/inf become null, tensors plain lists."""
    if isinstance(value, torch.Tensor):
        return _finite(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def run_grid(
    out: str | Path,
    scale: str = "cpu",
    seeds: int | None = None,
    data_root: str = "../shared/data",
    cells: list[str] | None = None,
    accelerator: str = "auto",
) -> list[Path]:
    """Run (or resume) the grid; returns the cell files. Finished runs are skipped, with a log line."""
    if scale not in SCALES:
        raise ConfigurationError(f"scale={scale!r} must be one of {list(SCALES)}.")
    sc = SCALES[scale]
    n_seeds = sc.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise ConfigurationError(f"seeds={n_seeds} must be >= 1.")
    out = Path(out)
    selected = select_cells(sc, cells)
    written: list[Path] = []
    for cell in selected:
        for seed in range(n_seeds):
            path = run_dir(out, cell, seed) / CELL_FILENAME
            done = load_complete(path)
            if done is not None and done.get("scale") != sc.name:
                raise ConfigurationError(
                    f"{path} was measured at scale {done.get('scale')!r}, not {sc.name!r}; use another --out."
                )
            if done is not None:
                log.info("skip %s seed %d: %s is complete", cell.name, seed, path)
                written.append(path)
                continue
            target = None
            if cell.reference is not None:
                ref = load_complete(run_dir(out, cell.reference, seed) / CELL_FILENAME)
                if ref is None or ref.get("final_train_loss") is None:
                    raise ConfigurationError(f"{cell.name} needs the finished {cell.reference.name} seed {seed} run.")
                target = float(ref["final_train_loss"])
            log.info("run %s seed %d (scale %s)", cell.name, seed, sc.name)
            t0 = time.perf_counter()
            run_one(cell, seed, sc, out, data_root, target_loss=target, accelerator=accelerator)
            log.info("done %s seed %d in %.1f s", cell.name, seed, time.perf_counter() - t0)
            written.append(path)
    return written
