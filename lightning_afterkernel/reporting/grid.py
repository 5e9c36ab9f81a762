"""The paper grid: {MNIST, CIFAR-10} x {VGG, MLP} x {no augmentation, augmentation} plus the learning-rate study.

Every cell and seed is one Lightning ``fit`` with :class:`~lightning_afterkernel.callbacks.AfterKernelCallback`
(NTK and CK at epoch 0, after ``few_epochs`` and at the end, invariance scores on), summarised in
``<out>/<cell>/seed<k>/cell.json``. A run whose ``cell.json`` is complete is skipped; an unfinished one resumes
from its last epoch checkpoint (``checkpoints/last.ckpt``, written at the end of every epoch), with the epochs, kernel
rows, training losses and wall time of the interrupted attempt restored, and the global random state too, so that it
continues as the uninterrupted run would have. One ``<out>`` folder holds one scale: a run starts by writing an
incomplete ``cell.json`` that names its scale, and :func:`run_grid` refuses a folder holding another scale's runs.

Learning-rate study ("a larger learning rate, trained to the same training loss"): the cell ``<dataset>-<arch>-lr<lr>``
trains with the larger ``lr`` until its epoch-mean training loss is <= the final epoch-mean training loss of the
lr 0.01 cell ``<dataset>-<arch>-noaug`` with the same seed (which is run first), or until ``lr_max_epochs``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_afterkernel._io import atomic_write_json
from lightning_afterkernel.callbacks import AfterKernelCallback
from lightning_afterkernel.callbacks.rows import INVARIANCE_FAMILIES, KERNELS, ResultRow
from lightning_afterkernel.data import BinaryPairDataModule
from lightning_afterkernel.data.sources import DATASETS
from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.models import MLPClassifier, VGGClassifier

log = logging.getLogger("lightning_afterkernel.reporting")

CELL_FILENAME = "cell.json"
CELL_FORMAT = 1
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
    n_train: int | None  # kernel/SVM training subset (drawn from the training images; None: all of them)
    n_test: int | None  # kernel/SVM test subset (None: all the test images)
    n_invariance: int  # images the invariance scores are averaged over
    max_epochs: int  # epochs of the lr 0.01 runs
    few_epochs: int  # "after a few epochs": the intermediate kernel
    large_lr: float  # the learning-rate study's larger learning rate
    lr_max_epochs: int  # cap of the large-lr run (stops earlier once it reaches the target training loss)
    seeds: int  # default number of seeds
    invariance_images: str = "test"  # whose images: the first of the kernel test subset (the author's code) or train
    evidence_epochs: tuple[int, ...] = ()  # more kernel evaluations in the lr 0.01 no-augmentation cells


SCALES: dict[str, Scale] = {
    "tiny": Scale("tiny", 256, 128, 96, 96, 16, 2, 1, 0.1, 3, 1),
    "cpu": Scale("cpu", 2000, 1000, 1000, 500, 200, 5, 1, 0.1, 10, 3),
    "full": Scale("full", None, None, None, None, 1000, 10, 1, 0.1, 40, 3, evidence_epochs=(2, 5)),
}
"""``tiny``: seconds per cell, for tests. ``cpu``: the whole grid in about 20 minutes on 2 CPU cores.
``full``: the paper's own setting, as the author's code runs it: the networks train and are tested on the whole
splits (MNIST 3-vs-8 11,982 / 1,984, CIFAR-10 cat/ship 10,000 / 2,000 images) for 10 epochs at lr 0.01, the kernel
SVMs train on every training image and are tested on every test image, the invariance scores average over 1,000
test images, and "a few epochs" is 1; the learning-rate study trains at lr 0.1 down to the lr 0.01 run's final
training loss (at most 40 epochs). The lr 0.01 no-augmentation cells also evaluate the kernels after epochs 2 and
5, for the error-against-epochs evidence of the report."""


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


def read_cell(path: Path) -> dict[str, Any] | None:
    """The cell file at ``path`` if it exists and parses (complete or not), else None."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_complete(path: Path) -> dict[str, Any] | None:
    """The cell file at ``path`` if it exists, parses and is marked complete, else None."""
    data = read_cell(path)
    if data is not None and data.get("complete") is True and data.get("format") == CELL_FORMAT:
        return data
    return None


def scale_key(scale: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs comparable: the scale's definition, less its default seed count. Cell files from before
    ``invariance_images`` scored training images; those from before ``evidence_epochs`` evaluated no more epochs."""
    defaults = {"invariance_images": "train", "evidence_epochs": []}
    return defaults | {k: list(v) if isinstance(v, tuple) else v for k, v in scale.items() if k != "seeds"}


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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning does not save should_stop: a run resumed after it reached its target must not train on.
        if self.target is not None and self.losses and self.losses[-1] <= self.target:
            trainer.should_stop = True

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


class RunClock(pl.Callback):
    """Wall time of a run summed over its attempts. Resumable.

    An interrupted attempt counts up to its last checkpoint (the work after it is lost and redone). ``fit_s`` is the
    time inside ``trainer.fit``, ``total_s`` also counts loading the data and the final evaluation.
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._fit_start: float | None = None
        self._fit_end: float | None = None
        self.previous_total_s = 0.0
        self.previous_fit_s = 0.0
        self.attempts = 1

    @property
    def state_key(self) -> str:
        return "RunClock"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_end = time.perf_counter()

    def total_s(self) -> float:
        return self.previous_total_s + time.perf_counter() - self._start

    def fit_s(self) -> float:
        if self._fit_start is None:
            return self.previous_fit_s
        return self.previous_fit_s + (self._fit_end or time.perf_counter()) - self._fit_start

    def state_dict(self) -> dict[str, Any]:
        return {"total_s": self.total_s(), "fit_s": self.fit_s(), "attempts": self.attempts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous_total_s = float(state_dict["total_s"])
        self.previous_fit_s = float(state_dict["fit_s"])
        self.attempts = int(state_dict["attempts"]) + 1


class RandomState(pl.Callback):
    """Saves the global random states (torch, numpy, ``random``) in each checkpoint and restores them on resume.

    Lightning restores the model, optimiser and loops but not these, which draw the shuffle order and the
    augmentation; with them restored a resumed run continues as the uninterrupted one would have.
    """

    @property
    def state_key(self) -> str:
        return "RandomState"

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
            "random": [version, list(internal), gauss_next],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state_dict["random"]
        random.setstate((version, tuple(internal), gauss_next))


def _error(acc: Any) -> float | None:
    return None if acc is None or (isinstance(acc, float) and math.isnan(acc)) else 1.0 - float(acc)


def _kernel_summary(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    r = ResultRow.from_dict(row)
    return {
        "epoch": r.epoch,
        "error": r.error,
        "svm_test_error": _error(r.svm_test_acc),
        "svm_soft_test_error": _error(r.svm_soft_test_acc),
        "svm_separable": r.separable,
        "network_test_error_kernel_subset": _error(r.network_test_acc),
        "invariance": {f: r.invariance.get(f) for f in INVARIANCE_FAMILIES},
        "effective_rank": r.effective_rank,
        "alignment_to_initial": r.alignment_to_initial,
        "alignment_ntk_ck": r.alignment_ntk_ck,
        "cka_ntk_ck": r.cka_ntk_ck,
        "kta": r.kta,
    }


def summarise(rows: list[dict[str, Any]], few_epochs: int) -> dict[str, Any]:
    """Per kernel: the ``initial`` (epoch 0), ``few`` (epoch ``few_epochs``, if reached) and ``end`` rows."""
    out: dict[str, Any] = {}
    for kernel in KERNELS:
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
    data_root: str | None,
    target_loss: float | None = None,
    accelerator: str = "auto",
) -> dict[str, Any]:
    """Fit one cell with one seed (resuming from ``checkpoints/last.ckpt`` if present) and write its ``cell.json``.

    ``data_root`` None uses the package's bundled MNIST 3-vs-8 subset (MNIST cells only; for tests).
    """
    rdir = run_dir(out, cell, seed)
    clock = RunClock()
    pl.seed_everything(seed, workers=True, verbose=False)
    ckpt_dir = rdir / "checkpoints"
    last = _resume_checkpoint(ckpt_dir)
    if last is None:  # a fresh start: mark the folder as this scale's before anything else is written
        atomic_write_json(rdir / CELL_FILENAME, _started(cell, seed, scale))
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
    evidence = scale.evidence_epochs if cell.lr == PAPER_LR and not cell.augment else ()
    after_kernel = AfterKernelCallback(
        epochs=sorted({0, scale.few_epochs, *(e for e in evidence if e < max_epochs)}),
        at_end=True,
        kernels=list(KERNELS),
        n_train=scale.n_train or _split_size(dm, "train"),
        n_test=scale.n_test or _split_size(dm, "test"),
        seed=0,
        n_invariance=scale.n_invariance,
        invariance_images=scale.invariance_images,
        dirpath=str(rdir / "afterkernel"),
        figures=False,
        progress=False,
        verbose=False,
        on_error="warn",
    )
    tracker = TrainLossTracker(target=target_loss)
    # save_top_k=1 without a monitor keeps the latest epoch's checkpoint, and save_last copies it to last.ckpt at
    # the end of every epoch (with save_top_k=0 Lightning would write last.ckpt only when training ends)
    checkpoint = ModelCheckpoint(
        dirpath=str(ckpt_dir),
        monitor=None,
        save_top_k=1,
        save_last=True,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
    )
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        logger=False,
        callbacks=[after_kernel, tracker, clock, RandomState(), checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(rdir),
    )
    resumed = last is not None
    if resumed:
        log.info("%s seed %d: resuming from %s", cell.name, seed, last)
    trainer.fit(model, datamodule=dm, ckpt_path=str(last) if resumed else None)
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
            "n_train": after_kernel.n_train,  # the kernel subsets (the whole splits where the scale says None)
            "n_test": after_kernel.n_test,
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
            "fit_s": clock.fit_s(),
            "kernel_s": sum(r.get("kernel_time_s", 0.0) or 0.0 for r in rows),
            "svm_s": sum(r.get("svm_time_s", 0.0) or 0.0 for r in rows),
            "analysis_s": sum(r.get("analysis_time_s", 0.0) or 0.0 for r in rows),
            "total_s": clock.total_s(),
            "resumed": resumed,
            "attempts": clock.attempts,
        },
        "rows": rows,
    }
    atomic_write_json(rdir / CELL_FILENAME, payload)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # keep the committed outputs small: the cell file is the result
    for pt in (rdir / "afterkernel").glob("*.pt"):
        pt.unlink()
    return payload


def _split_size(dm: BinaryPairDataModule, split: str) -> int:
    """Examples in a split of the data module (the kernel subsets' size when a scale takes them all)."""
    dm.prepare_data()
    dm.setup("fit")
    return len(dm.tensors(split)[1])


def _started(cell: Cell, seed: int, scale: Scale) -> dict[str, Any]:
    """The incomplete cell file a run writes first: it claims the folder for its scale."""
    return {
        "format": CELL_FORMAT,
        "complete": False,
        "cell": cell.name,
        "seed": seed,
        "scale": scale.name,
        "config": {"scale": asdict(scale)},
    }


def _resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest readable checkpoint in ``ckpt_dir`` (``last.ckpt`` first), or None.

    A checkpoint cut short by a kill while it was being written is skipped in favour of the previous one.
    """
    candidates = sorted(Path(ckpt_dir).glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime))
    for path in reversed(candidates):
        try:
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 (any unreadable file: try the previous checkpoint)
            log.warning("ignoring the unreadable checkpoint %s: %s", path, err)
            continue
        return path
    return None


def run_grid(
    out: str | Path,
    scale: str = "cpu",
    seeds: int | None = None,
    data_root: str | None = "../shared/data",
    cells: list[str] | None = None,
    accelerator: str = "auto",
) -> list[Path]:
    """Run (or resume) the grid; returns the cell files. Finished runs are skipped, with a log line.

    ``out`` holds one scale: a folder with runs (finished or not) of another scale is refused before anything runs.
    """
    if scale not in SCALES:
        raise ConfigurationError(f"scale={scale!r} must be one of {list(SCALES)}.")
    sc = SCALES[scale]
    n_seeds = sc.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise ConfigurationError(f"seeds={n_seeds} must be >= 1.")
    out = Path(out)
    selected = select_cells(sc, cells)
    check_one_scale(out, sc)
    written: list[Path] = []
    for cell in selected:
        for seed in range(n_seeds):
            path = run_dir(out, cell, seed) / CELL_FILENAME
            done = load_complete(path)
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


def check_one_scale(out: Path, scale: Scale) -> None:
    """Raise if ``out`` holds cell files (complete or started) of a scale other than ``scale``."""
    others: dict[str, list[Path]] = {}
    for path in sorted(Path(out).glob(f"*/seed*/{CELL_FILENAME}")):
        data = read_cell(path)
        if data is None or "scale" not in data:
            continue
        cfg = _get_scale_config(data)
        if data["scale"] != scale.name:
            others.setdefault(repr(data["scale"]), []).append(path)
        elif cfg is not None and scale_key(cfg) != scale_key(asdict(scale)):
            others.setdefault(f"{scale.name!r} as defined by another version ({cfg})", []).append(path)
    if others:
        found = "; ".join(f"scale {name}: {len(paths)} run(s), e.g. {paths[0]}" for name, paths in others.items())
        raise ConfigurationError(
            f"--out {out} already holds runs of another scale ({found}), and one folder holds one scale: its report "
            f"would compare cells measured at different sizes. Pass another --out for --scale {scale.name}, or rerun "
            "with the folder's own --scale to continue it."
        )


def _get_scale_config(data: dict[str, Any]) -> dict[str, Any] | None:
    cfg = data.get("config")
    scale = cfg.get("scale") if isinstance(cfg, dict) else None
    return scale if isinstance(scale, dict) else None
