"""`reproduce` resumes an interrupted run from its last epoch checkpoint (tiny scale, the bundled MNIST subset)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lightning_afterkernel.reporting import grid

CELL = "mnist-mlp-aug"  # with augmentation: the resumed run must also continue the random augmentation stream
SLEEP_S = 1.0
TIMING_KEYS = ("kernel_time_s", "svm_time_s", "analysis_time_s")
BaseTracker = grid.TrainLossTracker
SCALES_TINY_LR_CAP = grid.SCALES["tiny"].lr_max_epochs


class Interrupted(RuntimeError):
    """Stands for a kill or crash between two epochs."""


def tracker(interrupt_at: int | None = None, started: list[int] | None = None, sleep_s: float = 0.0) -> type:
    """The grid's TrainLossTracker, which also records the epochs it sees start, can stop the run when epoch
    ``interrupt_at`` starts, and sleeps at the end of each epoch (before that epoch's checkpoint is written)."""

    class Tracker(BaseTracker):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if started is not None:
                started.append(trainer.current_epoch)
            if trainer.current_epoch == interrupt_at:
                raise Interrupted(f"interrupted at the start of epoch {interrupt_at}")
            super().on_train_epoch_start(trainer, pl_module)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            super().on_train_epoch_end(trainer, pl_module)
            time.sleep(sleep_s)

    return Tracker


def run(out) -> dict:
    grid.run_grid(out, "tiny", seeds=1, data_root=None, cells=[CELL], accelerator="cpu")
    return json.loads((out / CELL / "seed0" / grid.CELL_FILENAME).read_text())


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_an_interrupted_cell_resumes_from_its_last_epoch_checkpoint(tmp_path, monkeypatch):
    straight = run(tmp_path / "straight")
    assert straight["timings"]["resumed"] is False and straight["timings"]["attempts"] == 1

    out = tmp_path / "interrupted"
    rdir = out / CELL / "seed0"
    monkeypatch.setattr(grid, "TrainLossTracker", tracker(interrupt_at=1, sleep_s=SLEEP_S))
    with pytest.raises(Interrupted):
        run(out)
    assert (rdir / "checkpoints" / "last.ckpt").is_file()  # written at the end of epoch 0, not only at the end
    assert json.loads((rdir / grid.CELL_FILENAME).read_text())["complete"] is False
    before = json.loads((rdir / "afterkernel" / "afterkernel_results.json").read_text())["results"]
    assert sorted({r["epoch"] for r in before}) == [0, 1]  # the initial kernels and those after epoch 0

    started: list[int] = []
    monkeypatch.setattr(grid, "TrainLossTracker", tracker(started=started))
    t0 = time.perf_counter()
    resumed = run(out)
    second_attempt_s = time.perf_counter() - t0

    assert started == [1]  # epoch 0 was not trained again
    assert resumed["complete"] is True
    assert resumed["timings"]["resumed"] is True and resumed["timings"]["attempts"] == 2
    # the rows from before the interruption are kept as they were (their timings included), not recomputed
    kept = [r for r in resumed["rows"] if r["epoch"] <= 1]
    assert [{k: r[k] for k in TIMING_KEYS} for r in kept] == [{k: r[k] for k in TIMING_KEYS} for r in before]
    # same data order and augmentation after the resume: the run ends exactly where the uninterrupted one does
    assert resumed["epochs_trained"] == straight["epochs_trained"] == 2
    assert resumed["train_loss_per_epoch"] == straight["train_loss_per_epoch"]
    assert resumed["network_test_error"] == straight["network_test_error"]
    assert without_timings(resumed["rows"]) == without_timings(straight["rows"])
    # the run time counts the interrupted attempt up to its checkpoint (it slept SLEEP_S before it), not only the
    # attempt that finished
    assert resumed["timings"]["total_s"] >= second_attempt_s + 0.9 * SLEEP_S
    assert resumed["timings"]["fit_s"] >= 0.9 * SLEEP_S
    assert not (rdir / "checkpoints").exists()


def test_a_checkpoint_cut_short_falls_back_to_the_previous_one(tmp_path):
    assert grid._resume_checkpoint(tmp_path / "checkpoints") is None
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"epoch": 0}, folder / "epoch=0-step=8.ckpt")
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 killed while writing")
    assert grid._resume_checkpoint(folder) == folder / "epoch=0-step=8.ckpt"
    torch.save({"epoch": 0}, folder / "last.ckpt")
    assert grid._resume_checkpoint(folder) == folder / "last.ckpt"


def test_a_cell_that_reached_its_target_loss_does_not_train_on_when_resumed(tmp_path, monkeypatch):
    """The learning-rate cell stops once its training loss reaches the reference's; Lightning does not save
    should_stop, so a run interrupted after its last checkpoint (here: in the final bookkeeping) must stop again."""
    cell = "mnist-mlp-lr0.1"

    def run_lr(out) -> dict:
        grid.run_grid(out, "tiny", seeds=1, data_root=None, cells=[cell], accelerator="cpu")
        return json.loads((out / cell / "seed0" / grid.CELL_FILENAME).read_text())

    straight = run_lr(tmp_path / "straight")
    assert straight["reached_target_loss"] and straight["epochs_trained"] < SCALES_TINY_LR_CAP

    out = tmp_path / "interrupted"
    reference = "mnist-mlp-noaug"
    (out / reference).parent.mkdir(parents=True)
    (out / reference).symlink_to(tmp_path / "straight" / reference, target_is_directory=True)

    def crash(*args, **kwargs):
        raise Interrupted("killed after training, before cell.json")

    with monkeypatch.context() as patch:
        patch.setattr(grid, "network_test_error", crash)
        with pytest.raises(Interrupted):
            run_lr(out)
    resumed = run_lr(out)
    assert resumed["timings"]["resumed"] is True
    assert resumed["epochs_trained"] == straight["epochs_trained"]
    assert sorted({(r["epoch"], r["step"]) for r in resumed["rows"]}) == sorted(
        {(r["epoch"], r["step"]) for r in straight["rows"]}
    )
