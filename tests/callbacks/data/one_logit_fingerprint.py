"""A one-logit run's fingerprint: what the multi-class change must leave bit for bit as it was.

``one_logit_29f5081.json`` was written by this script with the code of ``main`` at commit 29f5081 (before the
callback took multi-class models), run once from the project root as
``OMP_NUM_THREADS=1 python tests/callbacks/data/one_logit_fingerprint.py``;
``tests/callbacks/test_multiclass.py`` runs :func:`fingerprint` with the current code and compares. Rerunning the
script with later code writes that code's values, not 29f5081's.

The runs: the paper's MLP and VGG (one logit, small widths) on the bundled MNIST 3-vs-8 subset (300 training
images), 2 epochs, AfterKernelCallback(epochs=[0, 1], n_train=60, n_test=40, n_invariance=10, save_kernels=True),
one thread. The fingerprint holds every row (timings left out), every logged metric
with its step, the results file (timings left out), the names of the files written and a SHA-256 of every saved Gram
matrix and label vector.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers.logger import Logger

from lightning_afterkernel.callbacks import AfterKernelCallback
from lightning_afterkernel.data import BinaryPairDataModule
from lightning_afterkernel.models import MLPClassifier, VGGClassifier

OUT = Path(__file__).with_name("one_logit_29f5081.json")
TIMES = ("kernel_time_s", "svm_time_s", "analysis_time_s")


class _Metrics(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "fingerprint"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))


def _plain(value: Any) -> Any:
    """JSON values that compare exactly: NaN as the string "nan" (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _run(build: Callable[[], pl.LightningModule], folder: Path) -> dict[str, Any]:
    pl.seed_everything(0)
    model = build()
    logger = _Metrics()
    callback = AfterKernelCallback(
        epochs=[0, 1], n_train=60, n_test=40, n_invariance=10, save_kernels=True, verbose=False, dirpath=str(folder)
    )
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[callback],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        accelerator="cpu",
        deterministic=True,
    )
    trainer.fit(model, datamodule=BinaryPairDataModule(root=None, train_subset=300, test_subset=200))
    results = json.loads((folder / "afterkernel_results.json").read_text())
    results["results"] = [{k: v for k, v in r.items() if k not in TIMES} for r in results["results"]]
    saved = {}
    for path in sorted((folder / "kernels").glob("*.pt")):
        payload = torch.load(path, weights_only=True)
        saved[path.name] = {k: _digest(payload[k]) for k in ("k_train", "k_test", "y_train", "y_test")}
    return _plain(
        {
            "rows": [{k: v for k, v in r.items() if k not in TIMES} for r in callback.results],
            "logged": [[step, metrics] for step, metrics in logger.logged if any("afterkernel" in k for k in metrics)],
            "results_file": results,
            "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
            "kernels": saved,
            "summary": callback.summary_table(),
        }
    )


def fingerprint(folder: Path) -> dict[str, Any]:
    """The fingerprints of the MLP and the VGG runs, written under ``folder``, with one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "mlp": _run(lambda: MLPClassifier(width=16), folder / "mlp"),
            "vgg": _run(lambda: VGGClassifier(width=4), folder / "vgg"),
        }
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        OUT.write_text(json.dumps(fingerprint(Path(tmp)), indent=1) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)
