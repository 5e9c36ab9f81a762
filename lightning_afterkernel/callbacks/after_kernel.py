"""``AfterKernelCallback``: compute, judge and analyse the network's kernels at chosen epochs of ``fit``.

The callback decides *when* to compute and *what* to log; the maths lives in
:mod:`lightning_afterkernel.kernels`, :mod:`lightning_afterkernel.svm` and :mod:`lightning_afterkernel.invariance`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_afterkernel._io import atomic_torch_save, atomic_write_json, finite_or_none
from lightning_afterkernel.callbacks import _figures
from lightning_afterkernel.errors import ConfigurationError, DataError, KernelError, SolverError
from lightning_afterkernel.invariance import PAPER_FAMILIES, invariance_scores
from lightning_afterkernel.kernels import (
    IMPLEMENTATIONS,
    centered_kernel_alignment,
    conjugate_kernel,
    effective_rank,
    eigenspectrum,
    empirical_ntk_train_test,
    has_features_method,
    kernel_alignment,
    kernel_distance,
    kernel_target_alignment,
    parse_memory_budget,
)
from lightning_afterkernel.kernels._model import eval_mode
from lightning_afterkernel.svm import HardMarginSVM, SoftMarginSVM

KernelName = Literal["ntk", "ck"]
KERNEL_LABELS = {"ntk": "NTK", "ck": "CK"}
RESULTS_FILENAME = "afterkernel_results.json"
INITIAL_KERNELS_FILENAME = "afterkernel_initial_kernels.pt"
INITIAL_WEIGHTS_FILENAME = "afterkernel_initial_weights.pt"
KERNELS_DIRNAME = "kernels"
FIGURES_DIRNAME = "figures"
KERNEL_FILE_FORMAT = 1
"""Version of the dict in ``kernels/epoch_<e>_<kernel>.pt`` (see :class:`AfterKernelCallback`)."""
INVARIANCE_FAMILIES = tuple(PAPER_FAMILIES)
"""The paper's four invariance scores: globalness, shift, rotation, zoom."""
INVARIANCE_IMAGES = ("test", "train")
"""Whose images the invariance scores are on: the kernel test subset's (the default, as the author's code) or the
train subset's."""
KERNEL_METRICS = (
    "svm_test_acc",
    "svm_min_margin",
    "svm_n_support",
    "svm_separable",
    "alignment_to_initial",
    "cka_to_initial",
    "distance_to_initial",
    "kta",
    "effective_rank",
    "effective_rank_entropy",
)
"""Per-kernel fields of a result row logged as ``afterkernel/<kernel>/<field>``."""


def _check_epochs(epochs: Sequence[int]) -> list[int]:
    out = list(epochs)
    if any(not isinstance(e, int) or isinstance(e, bool) or e < 0 for e in out):
        raise ConfigurationError(
            f"epochs={out!r} must be non-negative integers: 0 is the initial kernel (before any step), "
            "e the kernel after e training epochs."
        )
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ConfigurationError(f"epochs={out!r} must be strictly increasing, e.g. [0, 2, 10].")
    return out


def _check_kernels(kernels: Sequence[str]) -> list[str]:
    out = [kernels] if isinstance(kernels, str) else list(kernels)
    unknown = [k for k in out if k not in KERNEL_LABELS]
    if not out or unknown or len(set(out)) != len(out):
        raise ConfigurationError(
            f"kernels={out!r} must be a non-empty list without repeats drawn from {list(KERNEL_LABELS)} "
            "('ntk': empirical neural tangent kernel, 'ck': conjugate kernel of the penultimate features)."
        )
    return out


@contextlib.contextmanager
def _global_rng_untouched(device: torch.device | None = None) -> Iterator[None]:
    """Run a block (a dataset's random transforms, an evaluation) without advancing torch's (CPU, and ``device``'s
    when it is a GPU), Python's or NumPy's global RNG: training draws the same numbers with or without the callback."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _fit_val_loader(trainer: pl.Trainer) -> Any:
    """The first validation dataloader of fit (given to ``fit()`` or the model's hook), even when Lightning runs no
    validation (``limit_val_batches=0``, no ``validation_step``); None when there is none."""
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    if source.instance is None or not source.is_defined():
        return None
    loaders = source.dataloader()
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return loaders


def _nan_for_none(row: dict[str, Any]) -> dict[str, Any]:
    """A result row read back from the results file: its nulls are the NaN metrics that ``finite_or_none`` wrote."""
    return {k: math.nan if v is None else v for k, v in row.items()}


def _plain(value: Any) -> Any:
    """Hyperparameters as plain Python values (loadable with ``torch.load(weights_only=True)``); others by repr."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_plain(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return repr(value)


class _KernelProgress:
    """A progress display for one kernel computation that sits beside Lightning's progress bar: a task
    in :class:`~pytorch_lightning.callbacks.RichProgressBar`'s live display, or a tqdm bar on the line
    below :class:`~pytorch_lightning.callbacks.TQDMProgressBar`'s; nothing when the Trainer shows none.
    Used as ``with _KernelProgress(trainer, label, enabled) as progress``, ``progress`` being a callable
    ``(done, total)`` or None."""

    def __init__(self, trainer: pl.Trainer, label: str, *, enabled: bool) -> None:
        self.bar = trainer.progress_bar_callback if enabled else None
        self.label = label
        self._task: Any = None
        self._tqdm: Any = None

    def __enter__(self) -> Any:
        bar = self.bar
        if bar is None or not bar.is_enabled:
            return None
        if isinstance(bar, RichProgressBar):
            return self._rich if bar.progress is not None else None
        if isinstance(bar, TQDMProgressBar):
            return self._tqdm_update
        return None

    def _rich(self, done: int, total: int) -> None:
        progress = self.bar.progress
        if self._task is None:
            self._task = progress.add_task(self.label, total=total)
        progress.update(self._task, completed=done)
        progress.refresh()

    def _tqdm_update(self, done: int, total: int) -> None:
        if self._tqdm is None:
            self._tqdm = Tqdm(
                desc=self.label,
                total=total,
                position=2 * self.bar.process_position + 2,
                leave=False,
                dynamic_ncols=True,
                file=sys.stdout,
            )
        self._tqdm.update(done - self._tqdm.n)

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self.bar.progress.remove_task(self._task)
        if self._tqdm is not None:
            self._tqdm.close()


class AfterKernelCallback(pl.Callback):
    """Compute the network's kernels at chosen epochs, judge each with a hard-margin SVM and analyse them.

    At every scheduled point the callback takes fixed, seeded subsets of the training and test data
    (``n_train``, ``n_test`` examples), computes for each requested kernel the train Gram matrix
    K(X_train, X_train) and the cross kernel K(X_test, X_train), fits
    :class:`~lightning_afterkernel.svm.HardMarginSVM` and logs, per kernel (``<kernel>`` = ``ntk``/``ck``):

    - ``afterkernel/<kernel>/svm_test_acc``: the SVM's test accuracy on the kernel test subset,
    - ``afterkernel/<kernel>/svm_min_margin``, ``svm_n_support``, ``svm_separable``,
    - ``afterkernel/<kernel>/alignment_to_initial``: uncentred alignment with the epoch-0 kernel,
      ``cka_to_initial``: centred alignment with it, ``distance_to_initial``: the relative change
      ||K - K_0||_F / ||K_0||_F (:func:`~lightning_afterkernel.kernels.kernel_distance`, ``"frobenius"``),
    - ``afterkernel/<kernel>/kta``: kernel-target alignment y^T K y / (n ||K||_F) on the train subset,
    - ``afterkernel/<kernel>/effective_rank`` (tr K / lambda_max, the paper's) and ``effective_rank_entropy``
      (exp of the entropy of the normalised eigenvalues),
    - ``afterkernel/<kernel>/invariance/<family>`` for ``globalness``, ``shift``, ``rotation``, ``zoom``: the
      paper's mean kernel-space cosine between x and T x
      (:func:`~lightning_afterkernel.invariance.invariance_scores`) on the first ``n_invariance`` images of the
      test subset (``invariance_images="test"``, the author's code) or of the train subset,

    plus ``afterkernel/alignment_ntk_ck`` and ``afterkernel/cka_ntk_ck`` (NTK vs CK on the train subset) and
    ``afterkernel/network_test_acc`` (the network itself on the same test subset). ``ntk`` at epoch 0
    is the *initial kernel*; later it is the *after kernel*. Every metric is computed from the Gram
    matrices computed once for the SVM (the invariance scores need only the per-image diagonals of the
    transformed views). A metric that is undefined for a kernel (e.g. a CK with a zero feature vector) is
    NaN, with a warning; training goes on.

    Outputs in the output folder (``dirpath``): ``afterkernel_results.json`` (one row per epoch and kernel with
    all the numbers above), ``afterkernel_initial_kernels.pt`` (the epoch-0 train kernels, for resuming), and

    - with ``figures=True``, PNGs in ``figures/``: ``kernel_heatmap_epoch_<e>.png`` (the train kernels,
      cosine-normalised, sorted by class), ``eigenspectrum_epoch_<e>.png`` (eigenvalues / the largest, log-log,
      initial vs epoch e), ``invariance.png`` (scores vs epoch) and ``accuracy.png`` (SVM and network test
      accuracy vs epoch), redrawn at every evaluation and logged to W&B (``afterkernel/figures/<name>``) when the
      Trainer has a :class:`~pytorch_lightning.loggers.WandbLogger`;
    - with ``save_kernels=True``, ``kernels/epoch_<e>_<kernel>.pt`` per evaluation and kernel: a dict for
      ``torch.load(path, weights_only=True)`` with ``format`` (1), ``kernel`` (``"ntk"``/``"ck"``), ``epoch``,
      ``step``, ``k_train`` (n_train, n_train) = K(X_train, X_train) and ``k_test`` (n_test, n_train) =
      K(X_test, X_train) in the computation ``dtype``, ``y_train``, ``y_test`` (int64 labels),
      ``train_indices``, ``test_indices`` (positions in the training and test data), ``seed``, ``model``
      (class name), ``hparams`` (the model's hyperparameters, plain values) and ``num_parameters``. Written
      atomically (temporary file, then ``os.replace``); n_train^2 + n_test n_train floats each.

    Args:
        epochs: when to compute. 0 = at the start of fit, before any optimisation step; e > 0 =
            after e completed training epochs. Strictly increasing.
        at_end: also compute once training ends (if that point is not already in ``epochs``).
        kernels: any of ``"ntk"`` (empirical NTK) and ``"ck"`` (conjugate kernel; needs the model
            to define ``features(x)``, otherwise it is skipped with a message).
        n_train: size of the fixed training subset the SVM is trained on.
        n_test: size of the fixed test subset it is evaluated on.
        seed: seed of the subset draw (independent of the global RNG, so training is unaffected).
        svm: keyword arguments for :class:`~lightning_afterkernel.svm.HardMarginSVM`.
        soft_margin_c: when a kernel admits no hard-margin SVM (e.g. a conjugate kernel with fewer
            features than training examples), fit :class:`~lightning_afterkernel.svm.SoftMarginSVM`
            with this C on the normalised kernel and report its test accuracy as
            ``svm_soft_test_acc``; ``None`` disables the fallback.
        n_invariance: number of images the invariance scores are averaged over: the first
            ``min(n_invariance, n_test)`` of the (random, seeded) test subset, or of the train subset (see
            ``invariance_images``), so no extra data is drawn. 0 turns the scores off. They need image batches
            (n, C, H, W); the globalness score needs an even height and width (otherwise it is skipped with a
            message). Cost: 7 per-image kernel diagonals each (the image and its six transforms), no n x n matrix.
        invariance_images: ``"test"`` (the default, as the author's code, which scores the first test images) or
            ``"train"`` (the images the SVM trains on, which the network has fitted). A resumed fit must use the
            choice its checkpoint's (and results file's) scores were computed with (from before this option:
            ``"train"``); another one raises :class:`ConfigurationError` before anything is computed.
        kernel_batch_size: examples per forward/backward chunk in the kernel computation (None: from the
            memory budget).
        implementation: the NTK engine's implementation (see
            :func:`~lightning_afterkernel.kernels.empirical_ntk`); ``"auto"`` takes the fast structured
            engine whenever the model allows it.
        memory_budget: working memory of the NTK computation, bytes or a string such as ``"4GiB"``
            (None: half the free GPU memory, a quarter of the available RAM on CPU).
        dtype: ``"float32"`` or ``"float64"`` for the kernel computation.
        progress: show the kernel computation's progress beside Lightning's progress bar (when the Trainer
            has one).
        dirpath: where ``afterkernel_results.json``, figures and kernels are written (None: the Trainer's log
            dir; with W&B, ``<save_dir>/afterkernel/<run id>``).
        figures: draw the PNG figures after every evaluation (and log them to W&B).
        save_kernels: save the train and test Gram matrices of every evaluation (format above).
        verbose: print the summary table at the end of fit.
        on_error: what a failed kernel computation does: non-finite network outputs or kernels, or a
            :class:`~lightning_afterkernel.errors.KernelError` from the engine. ``"raise"``: a ``KernelError``
            naming the epoch and kernel stops training; ``"warn"``: the evaluation is recorded as failed (NaN
            metrics and an ``error`` message in its rows) with a warning, and training goes on. Running out of
            memory (after the engine's retries with half the budget each) is always recorded, never raised:
            training never crashes because of the callback's memory use.
        name: tells several callbacks in one Trainer apart (e.g. a float32 and a float64 one, or two SVM
            settings): each writes to ``<dirpath>/<name>``, logs under ``afterkernel/<name>/...`` and keeps its own
            checkpoint state. Two callbacks with the same name (None included) in one Trainer are an error.

    Data: the test subset comes from ``datamodule.tensors("test")`` when the datamodule has it
    (``BinaryPairDataModule`` does), else from ``datamodule.test_dataset`` / ``val_dataset`` or the
    validation dataloader's dataset (the one given to ``fit`` or the model's hook, even when no validation runs);
    the train subset likewise from the training data. A loader hook that fails (e.g. a test set built only in
    ``setup("test")``) is passed over for the next source. Any map-style dataset returning ``(x, y)`` with binary
    ``y`` works; its transforms are applied when the subsets are drawn (once per fit), with the global random
    state saved and restored around them, so training draws the same numbers with or without the callback.

    Distributed runs (DDP, any number of devices and nodes): every rank computes a cost-balanced share of the NTK
    (``shard=(rank, world_size)`` of :func:`~lightning_afterkernel.kernels.empirical_ntk_train_test`) and one
    all-reduce (sum) gives every rank the exact kernel; the CK, the SVM, the analyses (invariance scores included),
    logging and files are global rank 0's. Every rank takes the same decisions (which epochs to evaluate, which
    kernels failed), so all enter the same collectives.

    Resuming (``ckpt_path``): results live in the checkpoint; the results file is checked against them and
    rewritten when corrupt, partial or missing. Rows the file holds beyond the checkpoint's are kept when they
    were computed on the checkpoint's own weights (its step: e.g. the ``at_end`` row, computed after the last
    checkpoint) and dropped otherwise (their weights were lost; scheduled epochs are computed again on the way).
    A checkpoint saved mid-epoch resumes without evaluating: a scheduled epoch whose end it skipped is announced
    as missed. The epoch-0 weights are saved beside the epoch-0 kernels (``afterkernel_initial_weights.pt``), so
    kernels missing or corrupt in the side file are recomputed from them; the checkpoint names both files, so a
    resumed run whose log folder is new (a new logger version or W&B run) still finds them, resume after resume.
    A new fit that starts at step 0 (e.g. the same callback passed to a second Trainer) starts a new history.
    """

    def __init__(
        self,
        epochs: list[int] = [0],  # noqa: B006  (jsonargparse needs a literal default to show it)
        at_end: bool = True,
        kernels: list[KernelName] = ["ntk", "ck"],  # noqa: B006
        n_train: int = 1000,
        n_test: int = 500,
        seed: int = 0,
        svm: dict[str, Any] | None = None,
        soft_margin_c: float | None = 1.0,
        kernel_batch_size: int | None = None,
        implementation: Literal["auto", "structured", "materialised", "vmap"] = "auto",
        memory_budget: int | str | None = None,
        dtype: Literal["float32", "float64"] = "float32",
        progress: bool = True,
        dirpath: str | None = None,
        verbose: bool = True,
        n_invariance: int = 500,
        invariance_images: Literal["test", "train"] = "test",
        figures: bool = True,
        save_kernels: bool = False,
        on_error: Literal["raise", "warn"] = "raise",
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.epochs = _check_epochs(epochs)
        self.kernels = _check_kernels(kernels)
        if not self.epochs and not at_end:
            raise ConfigurationError("Nothing to compute: epochs is empty and at_end is False.")
        if not isinstance(n_train, int) or n_train < 2:
            raise ConfigurationError(f"n_train={n_train!r} must be an integer >= 2 (the SVM needs both classes).")
        if not isinstance(n_test, int) or n_test < 1:
            raise ConfigurationError(f"n_test={n_test!r} must be a positive integer.")
        if dtype not in ("float32", "float64"):
            raise ConfigurationError(f"dtype={dtype!r} must be 'float32' or 'float64'.")
        if kernel_batch_size is not None and kernel_batch_size < 1:
            raise ConfigurationError(f"kernel_batch_size={kernel_batch_size} must be positive or None.")
        if implementation not in IMPLEMENTATIONS:
            raise ConfigurationError(f"implementation={implementation!r} must be one of {list(IMPLEMENTATIONS)}.")
        parse_memory_budget(memory_budget)  # a bad budget fails here, not after the first epoch
        self.svm_kwargs = dict(svm or {})
        try:  # unknown SVM options or bad values fail here, not hours into training
            HardMarginSVM(**self.svm_kwargs).check_params()
        except TypeError as err:
            raise ConfigurationError(
                f"svm={self.svm_kwargs!r} is not a valid set of HardMarginSVM options: {err}"
            ) from err
        if soft_margin_c is not None and not soft_margin_c > 0:
            raise ConfigurationError(f"soft_margin_c={soft_margin_c!r} must be a positive C, or None to disable.")
        if isinstance(n_invariance, bool) or not isinstance(n_invariance, int) or n_invariance < 0:
            raise ConfigurationError(
                f"n_invariance={n_invariance!r} must be a non-negative integer: the number of images the "
                "invariance scores are averaged over (0 turns them off)."
            )
        if invariance_images not in INVARIANCE_IMAGES:
            raise ConfigurationError(
                f"invariance_images={invariance_images!r} must be 'test' (score the first images of the test subset, "
                "as the paper's code does) or 'train' (those of the train subset)."
            )
        if on_error not in ("raise", "warn"):
            raise ConfigurationError(
                f"on_error={on_error!r} must be 'raise' (a failed kernel computation stops training) or 'warn' "
                "(it is recorded with NaN metrics and a warning, and training goes on)."
            )
        for option, value in (("figures", figures), ("save_kernels", save_kernels)):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{option}={value!r} must be True or False.")
        if name is not None and not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)):
            raise ConfigurationError(
                f"name={name!r} must be None or a short name of letters, digits, '_', '.' and '-' (it becomes a "
                "folder and a prefix of the logged keys), e.g. name='float64'."
            )
        self.name = name
        self._prefix = "afterkernel" if name is None else f"afterkernel/{name}"
        self.soft_margin_c = soft_margin_c
        self.n_invariance = n_invariance
        self.invariance_images = invariance_images
        self.figures = figures
        self.save_kernels = save_kernels
        self.on_error = on_error
        self.at_end = at_end
        self.n_train = n_train
        self.n_test = n_test
        self.seed = seed
        self.kernel_batch_size = kernel_batch_size
        self.implementation = implementation
        self.memory_budget = memory_budget
        self.progress = progress
        self.dtype = getattr(torch, dtype)
        self.dirpath = dirpath
        self.verbose = verbose

        self._dir: Path | None = None  # resolved in setup on every rank (log_dir is a collective under DDP)
        self._active_kernels = list(self.kernels)
        self._class_names: dict[int, str] = {}  # label -> class name for the figures, when the datamodule says
        self._start_history()

    def _start_history(self) -> None:
        """The state of one training history (a fit from step 0, and the fits that resume or continue it)."""
        self.results: list[dict[str, Any]] = []
        self._initial_kernels: dict[str, Tensor] = {}
        self._indices: dict[str, Tensor] = {}
        self._data: dict[str, tuple[Tensor, Tensor]] | None = None
        self._progress: int | float | None = None  # epochs behind the weights at the last epoch end
        # Where the epoch-0 kernels and weights are (written by this history, or named by a restored checkpoint:
        # a resumed run in a new log folder keeps pointing at the files of the run that wrote them).
        self._initial_file: str | None = None
        self._initial_weights_file: str | None = None
        self._results_file: str | None = None  # the results file of the run a restored checkpoint comes from
        self._saved_images = self.invariance_images  # the images a restored checkpoint's scores are on
        self._families: tuple[str, ...] | None = None  # invariance families the data allows, set at first use
        self._initial_spectra: dict[str, Tensor] = {}  # eigenvalues of the epoch-0 kernels, for the figures
        self._spectra: dict[str, Tensor] = {}  # eigenvalues of this evaluation's train kernels
        self._evaluated: set[tuple[int | float, int]] = set()  # (epoch, step) evaluated in this process, every rank

    @property
    def state_key(self) -> str:
        # The schedule is left out on purpose: resuming with more epochs keeps what was computed.
        key = dict(kernels=self.kernels, n_train=self.n_train, n_test=self.n_test, seed=self.seed)
        if self.name is not None:  # left out when unset: checkpoints of unnamed callbacks keep their key
            key["name"] = self.name
        return self._generate_state_key(**key)

    @property
    def done_epochs(self) -> list[int | float]:
        """Epochs of training behind each evaluation, ascending (fractional when training stopped mid-epoch)."""
        return sorted({row["epoch"] for row in self.results})

    def _done(self) -> tuple[set[int | float], set[int]]:
        """Epochs and global steps already evaluated, identical on every rank: rank 0's results (restored from the
        checkpoint on every rank) and the evaluations every rank took part in. The decision to evaluate rests on
        this alone, so all ranks enter the same collectives."""
        done = {(r["epoch"], r["step"]) for r in self.results} | self._evaluated
        return {e for e, _ in done}, {s for _, s in done}

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        twins = [c for c in trainer.callbacks if isinstance(c, AfterKernelCallback) and c is not self]
        if any(c.name == self.name for c in twins):
            which = "without a name" if self.name is None else f"named {self.name!r}"
            raise ConfigurationError(
                f"The Trainer has more than one AfterKernelCallback {which}: they would write the same files and log "
                "under the same keys. Give each its own name, e.g. AfterKernelCallback(name='float64')."
            )
        if trainer.global_step == 0 and (self.results or self._evaluated):
            # A new training history (a checkpoint's state, if any, is loaded after setup).
            rank_zero_info(
                f"AfterKernelCallback: a new fit starts at step 0; the {len(self.results)} results of the previous "
                f"fit stay in {self._dir / RESULTS_FILENAME if self._dir else 'its results file'}, and this callback "
                "starts afresh."
            )
            self._start_history()
        base = Path(self.dirpath) if self.dirpath else self._default_dir(trainer)
        self._dir = base if self.name is None else base / self.name
        if "ck" in self.kernels and not has_features_method(pl_module):
            self._active_kernels = [k for k in self.kernels if k != "ck"]
            rank_zero_warn(
                f"AfterKernelCallback: the conjugate kernel is skipped because {type(pl_module).__name__} "
                "has no `features(x)` method (a submodule named `features` does not count). Add one returning "
                "the penultimate features (n, d) to get the CK."
            )
            if not self._active_kernels:
                raise ConfigurationError(
                    "AfterKernelCallback: kernels=['ck'] but the model has no `features(x)` method; "
                    "add it, or ask for kernels=['ntk']."
                )
        else:
            self._active_kernels = list(self.kernels)
        dm = trainer.datamodule
        plus, minus = getattr(dm, "plus_class", None), getattr(dm, "minus_class", None)
        self._class_names = {0: f"{minus} (y=0)", 1: f"{plus} (y=1)"} if None not in (plus, minus) else {}
        if dm is not None and (callable(getattr(dm, "tensors", None)) or getattr(dm, "train_dataset", None)):
            self._data = self._draw_subsets(trainer)  # bad sizes or one-class subsets fail before training
        if self.epochs and trainer.max_epochs not in (None, -1) and self.epochs[-1] > trainer.max_epochs:
            late = [e for e in self.epochs if e > trainer.max_epochs]
            rank_zero_warn(
                f"AfterKernelCallback: epochs {late} lie beyond max_epochs={trainer.max_epochs} and will not be "
                "computed; raise max_epochs or drop them."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._data is None:
            self._data = self._draw_subsets(trainer)
        completed = trainer.current_epoch
        # Are the weights those after `completed` epochs? Yes on a fresh start and after a checkpoint of a finished
        # epoch; no after a mid-epoch checkpoint, or one saved after an epoch's last batch but before its end hooks
        # (Lightning then runs on_train_epoch_end first, which evaluates epoch completed + 1).
        epochs_run = trainer.fit_loop.epoch_progress.current
        batches_run = trainer.fit_loop.epoch_loop.batch_progress.current
        at_boundary = epochs_run.started == epochs_run.completed or batches_run.completed == 0
        if trainer.global_step > 0:
            conflict = self._images_conflict(self._saved_images, self.results, "the checkpoint")
            if conflict:  # before anything is computed (every rank holds the same state, so every rank raises)
                raise ConfigurationError(conflict)
            adopted, conflict = self._check_results_file(trainer) if trainer.is_global_zero else ([], None)
            # Every rank must agree on what is done (see _done): rank 0 read the file, so it tells the others.
            adopted, conflict = trainer.strategy.broadcast((adopted, conflict), src=0)
            if conflict:
                raise ConfigurationError(conflict)
            if not trainer.is_global_zero:
                self.results.extend(adopted)
            if trainer.is_global_zero:
                self._restore_initial_kernels(trainer, pl_module)
            done = self.done_epochs
            missed = [e for e in self.epochs if (e < completed or (e == completed and not at_boundary))]
            missed = [e for e in missed if e not in done]
            if missed:
                rank_zero_warn(
                    f"AfterKernelCallback: resuming at step {trainer.global_step} (epoch {completed}); scheduled "
                    f"epochs {missed} have no saved results (the checkpoint holds none for them) and their weights "
                    "are gone, so they are skipped."
                )
        if at_boundary and completed in self.epochs and completed not in self._done()[0]:
            # epoch 0 on a fresh start; on resume, an epoch whose checkpoint was saved at the boundary before
            # this callback's epoch-end evaluation ran.
            self._evaluate(trainer, pl_module, epoch=completed)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Lightning also calls this hook when max_steps ends an epoch early: count what really ran.
        seen = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        total = trainer.num_training_batches
        partial = math.isfinite(total) and 0 < total and seen < total
        if partial:  # enough decimals that no partial epoch rounds to a whole one (1999 / 2000 is not 1.0)
            digits = max(3, math.ceil(math.log10(total)))
            self._progress = round(trainer.current_epoch + seen / total, digits)
        else:
            self._progress = trainer.current_epoch + 1
        if not partial and self._progress in self.epochs and self._progress not in self._done()[0]:
            self._evaluate(trainer, pl_module, epoch=self._progress)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_end or self._data is None:
            return
        if trainer.global_step in self._done()[1]:
            return  # these very weights were already evaluated
        epoch = self._progress if self._progress is not None else trainer.current_epoch
        self._evaluate(trainer, pl_module, epoch=epoch)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.results:
            return
        self._log_table(trainer)
        if self.verbose:
            self.print_summary()

    def state_dict(self) -> dict[str, Any]:
        # The epoch-0 kernels (n_train^2 each) live in a side file, not in every checkpoint.
        return {
            "results": [dict(r) for r in self.results],
            "indices": {k: v.cpu() for k, v in self._indices.items()},
            "initial_kernels_file": self._initial_file if self._initial_kernels else None,
            "initial_weights_file": self._initial_weights_file,
            "results_file": str(self._dir / RESULTS_FILENAME) if self._dir is not None else None,
            "invariance_images": self.invariance_images,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = [dict(r) for r in state_dict.get("results", [])]
        self._indices = dict(state_dict.get("indices", {}))
        self._initial_file = state_dict.get("initial_kernels_file")
        # Checkpoints written before the weights' path was recorded: the weights lie beside the kernels.
        beside = str(Path(self._initial_file).with_name(INITIAL_WEIGHTS_FILENAME)) if self._initial_file else None
        self._initial_weights_file = state_dict.get("initial_weights_file", beside)
        self._results_file = state_dict.get("results_file")
        self._data = None  # re-drawn at the next on_train_start from the saved indices
        # checked when a fit resumes (on_train_start), not here: validate/test load the state too
        self._saved_images = state_dict.get("invariance_images", "train")  # older checkpoints: training images

    def _images_conflict(self, saved: str, rows: Sequence[dict[str, Any]], where: str) -> str | None:
        """Why ``rows`` (invariance scores on ``saved`` images) cannot join this callback's results, or None."""
        scored = any(key.startswith("invariance_") for row in rows for key in row)
        if self.n_invariance == 0 or not scored or saved == self.invariance_images:
            return None
        return (
            f"AfterKernelCallback: the invariance scores in {where} were computed on "
            f"{'training' if saved == 'train' else saved} images, and this callback has "
            f"invariance_images={self.invariance_images!r}: its curves would mix the two. Resume with "
            f"invariance_images={saved!r}, or start a new run."
        )

    # ---------------------------------------------------------------- data
    def _source(self, trainer: pl.Trainer, split: str) -> tuple[Tensor, Tensor] | Any:
        """(x, y) tensors or a map-style dataset for ``split`` ("train" or "test"), first match wins:
        ``datamodule.tensors(split)``; the datamodule's datasets; its dataloaders' datasets; the
        dataloaders given to ``fit`` (the validation ones stand in for test data)."""
        dm = trainer.datamodule
        if dm is not None and callable(getattr(dm, "tensors", None)):
            return dm.tensors(split)
        names = ("train_dataset",) if split == "train" else ("test_dataset", "val_dataset")
        hooks = ("train_dataloader",) if split == "train" else ("test_dataloader", "val_dataloader")
        # (what, getter, gives a loader): tried in order, lazily; a loader hook that fails (e.g. a test set built
        # only in setup("test")) counts as "not available here", and the next one is tried.
        candidates: list[tuple[str, Any, bool]] = []
        if dm is not None:
            candidates += [(f"datamodule.{name}", lambda name=name: getattr(dm, name, None), False) for name in names]
            candidates += [(f"datamodule.{hook}()", lambda hook=hook: getattr(dm, hook)(), True) for hook in hooks]
        elif split == "train":
            candidates.append(("the training dataloader", lambda: trainer.train_dataloader, True))
        else:
            candidates.append(("the validation dataloaders given to fit()", lambda: _fit_val_loader(trainer), True))
        problems = []
        for what, get, is_loader in candidates:
            try:
                found = get()
            except MisconfigurationException:  # the hook is not implemented
                continue
            except Exception as err:
                problems.append(f"{what} failed ({type(err).__name__}: {str(err)[:200]})")
                continue
            ds = getattr(found, "dataset", None) if is_loader else found
            if ds is not None:
                return ds
        what = "training" if split == "train" else "validation or test"
        raise DataError(
            f"AfterKernelCallback found no {what} data: give the Trainer a datamodule with `tensors(split)`, "
            f"`{names[0]}` or `{hooks[0]}()`, or pass {what} dataloaders to fit()."
            + (f" Tried: {'; '.join(problems)}." if problems else "")
        )

    def _draw_subsets(self, trainer: pl.Trainer) -> dict[str, tuple[Tensor, Tensor]]:
        data = {}
        for split, n in (("train", self.n_train), ("test", self.n_test)):
            source = self._source(trainer, split)
            size = len(source[0]) if isinstance(source, tuple) else len(source)
            if n > size:
                raise ConfigurationError(
                    f"AfterKernelCallback: n_{split}={n} is larger than the {size} {split} examples available; "
                    f"lower n_{split} to at most {size}."
                )
            idx = self._indices.get(split)
            if idx is None or len(idx) != n or int(idx.max()) >= size:
                idx = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed + (split == "test")))[:n]
                self._indices[split] = idx
            if isinstance(source, tuple):
                x, y = source[0][idx], source[1][idx]
            else:
                with _global_rng_untouched():  # a dataset's random transforms must not shift training's draws
                    items = [source[int(i)] for i in idx]
                x = torch.stack([torch.as_tensor(it[0]) for it in items])
                y = torch.as_tensor([int(it[1]) for it in items])
            y = y.long().flatten()
            classes = torch.unique(y).tolist()
            if split == "train" and len(classes) != 2:
                raise DataError(
                    f"AfterKernelCallback: the {n}-example {split} subset has labels {classes}; the SVM needs two "
                    "classes. Use a binary dataset, a larger n_train, or another seed."
                )
            data[split] = (x, y)
        return data

    # ---------------------------------------------------------------- evaluation
    def _shard(self, trainer: pl.Trainer) -> tuple[int, int] | None:
        """``(rank, world_size)`` when the NTK is shared out among DDP ranks, else None."""
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            return trainer.global_rank, trainer.world_size
        return None

    def _compute_kernel(
        self, trainer: pl.Trainer, name: str, model: pl.LightningModule, shard: tuple[int, int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """K(train, train) and K(test, train) on the kernel subsets, in ``dtype`` on the computation device; with
        ``shard``, this rank's share of the NTK (zeros elsewhere)."""
        assert self._data is not None
        x_train, x_test = self._data["train"][0], self._data["test"][0]
        options = dict(batch_size=self.kernel_batch_size, dtype=self.dtype, device=model.device)
        if name == "ntk":
            with _KernelProgress(trainer, "after kernel: NTK", enabled=self.progress) as progress:
                k_train, k_test = empirical_ntk_train_test(
                    model,
                    x_train,
                    x_test,
                    implementation=self.implementation,
                    memory_budget=self.memory_budget,
                    progress=progress,
                    shard=shard,
                    **options,
                )
        else:
            k_train = conjugate_kernel(model, x_train, **options)
            k_test = conjugate_kernel(model, x_test, x_train, **options)
        return k_train.detach(), k_test.detach()

    def _network_logits(self, pl_module: pl.LightningModule, epoch: int | float) -> Tensor:
        """The network's logits on the kernel test subset; a :class:`KernelError` when they are not finite."""
        assert self._data is not None
        x_te = self._data["test"][0]
        param = next(pl_module.parameters())
        with torch.no_grad(), eval_mode(pl_module):
            x = x_te.to(param.device, param.dtype if x_te.is_floating_point() else x_te.dtype)
            logits = pl_module(x).reshape(-1).float().cpu()
        bad = int((~torch.isfinite(logits)).sum())
        if bad:
            raise KernelError(
                f"the network's outputs at epoch {epoch} are not finite on {bad} of the {len(logits)} kernel test "
                "examples (nan or inf: diverged training?), so neither kernel can be computed; lower the learning "
                "rate or check the model."
            )
        return logits

    def _local_kernels(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int | float, shard: tuple[int, int] | None
    ) -> tuple[Tensor | None, dict[str, tuple[Tensor, Tensor, float]], dict[str, str]]:
        """This rank's part of an evaluation, with no collectives: the network's logits (every rank), its share
        of the NTK (every rank) and the CK (rank 0). Failures are returned by stage, not raised."""
        failures: dict[str, str] = {}
        try:
            logits = self._network_logits(pl_module, epoch)
        except KernelError as err:
            return None, {}, {"network": str(err)}
        kernels: dict[str, tuple[Tensor, Tensor, float]] = {}
        for name in self._active_kernels:
            if name == "ck" and trainer.global_rank != 0:
                continue  # cheap: rank 0 computes it alone
            t0 = time.perf_counter()
            try:
                k_train, k_test = self._compute_kernel(trainer, name, pl_module, shard if name == "ntk" else None)
            except (KernelError, torch.OutOfMemoryError) as err:
                failures[name] = f"the {KERNEL_LABELS[name]} computation at epoch {epoch} failed: {err}"
                if "out of memory" in str(err).lower():
                    self._memory_failures.add(name)
                continue
            bad = [what for what, k in (("train", k_train), ("test", k_test)) if not torch.isfinite(k).all()]
            if bad:
                failures[name] = (
                    f"the {KERNEL_LABELS[name]} at epoch {epoch} has non-finite entries (nan or inf) in its "
                    f"{' and '.join(bad)} kernel; check the model's weights and outputs."
                )
                continue
            kernels[name] = (k_train, k_test, time.perf_counter() - t0)
        return logits, kernels, failures

    def _agree_on_failures(
        self, failures: dict[str, str], device: torch.device, shard: tuple[int, int] | None, epoch: int | float
    ) -> dict[str, str]:
        """Every rank learns which stages failed on any rank (one small all-reduce), so all ranks take the same
        path through the collectives that follow and raise together."""
        stages = ["network", *self._active_kernels]
        if shard is None:
            return failures
        flags = torch.tensor(
            [float(s in failures) for s in stages]
            + [float(s in failures and s not in self._memory_failures) for s in stages],
            device=device,
        )
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.SUM)
        failed, other = flags.tolist()[: len(stages)], flags.tolist()[len(stages) :]
        self._memory_failures = {s for s, f, o in zip(stages, failed, other, strict=True) if f and not o}
        merged = {}
        for stage, flag in zip(stages, failed, strict=True):
            if flag:
                label = "network's outputs" if stage == "network" else KERNEL_LABELS[stage]
                elsewhere = f"the {label} at epoch {epoch} failed on another rank (see its log)"
                merged[stage] = failures.get(stage, elsewhere)
        return merged

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int | float = 0) -> None:
        """One evaluation. Every rank runs it (the same decisions on every rank: see :meth:`_done`): under DDP each
        rank computes its share of the NTK and one all-reduce sums them; the SVM, analyses, logs and files are
        rank 0's. The global RNGs are left as they were (e.g. scikit-learn's SVC, or a user's model)."""
        with _global_rng_untouched(pl_module.device):
            self._evaluate_now(trainer, pl_module, epoch)

    def _evaluate_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int | float) -> None:
        assert self._data is not None
        self._evaluated.add((epoch, trainer.global_step))
        self._memory_failures: set[str] = set()  # stages that ran out of memory (never stop training)
        shard = self._shard(trainer)
        logits, kernels, failures = self._local_kernels(trainer, pl_module, epoch, shard)
        if failures and trainer.global_rank != 0 and self.on_error == "warn":  # rank 0 only learns that it failed
            message = "; ".join(failures.values())
            warnings.warn(f"AfterKernelCallback (rank {trainer.global_rank}): {message}", stacklevel=2)
        failures = self._agree_on_failures(failures, pl_module.device, shard, epoch)
        if "network" in failures:
            failures = {name: failures["network"] for name in self._active_kernels}
        kernels = {name: k for name, k in kernels.items() if name not in failures}  # the same choice on all ranks
        if shard is not None and "ntk" in kernels:
            for k in kernels["ntk"][:2]:
                torch.distributed.all_reduce(k, op=torch.distributed.ReduceOp.SUM)
        if failures:
            message = "; ".join(dict.fromkeys(m.rstrip(". ") for m in failures.values()))
            if self.on_error == "raise" and not set(failures) <= self._memory_failures:
                raise KernelError(
                    f"AfterKernelCallback: {message}. Set on_error='warn' to record the failure (NaN metrics) "
                    "and keep training."
                )
            rank_zero_warn(f"AfterKernelCallback: {message}; recorded as failed (NaN metrics), training goes on.")
        if trainer.global_rank == 0:
            self._analyse(trainer, pl_module, epoch, logits, kernels, failures)

    def _failed_row(self, name: str, message: str) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(KERNEL_METRICS, math.nan)
        row.update(svm_soft_test_acc=math.nan, svm_time_s=math.nan, kernel_time_s=math.nan, analysis_time_s=math.nan)
        row.update({f"invariance_{family}": math.nan for family in self._invariance_families()})
        row["error"] = message
        return row

    def _analyse(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        epoch: int | float,
        logits: Tensor | None,
        kernels: dict[str, tuple[Tensor, Tensor, float]],
        failures: dict[str, str],
    ) -> None:
        """Rank 0's part of an evaluation: SVMs, analyses, logs, files and figures (no collectives)."""
        assert self._data is not None
        self._spectra = {}
        y_tr, y_te = self._data["train"][1], self._data["test"][1]
        network_acc = math.nan if logits is None else float(((logits > 0) == (y_te > 0)).double().mean())
        rows, train_grams = [], {}
        for name in self._active_kernels:
            row: dict[str, Any] = {"epoch": epoch, "step": trainer.global_step, "kernel": name}
            row["network_test_acc"] = network_acc
            if name not in kernels:
                row.update(self._failed_row(name, failures.get(name, "not computed")))
                rows.append(row)
                continue
            k_train, k_test, row["kernel_time_s"] = kernels[name]
            if self.save_kernels:
                self._save_kernels(trainer, name, epoch, k_train, k_test)
            k_test = k_test.to("cpu", torch.float64)
            if trainer.global_step == 0 and name not in self._initial_kernels:
                self._initial_kernels[name] = k_train.to("cpu", torch.float32)
            # The SVM and metrics run where the kernel is, in float64 (the interior-point method's Cholesky and the
            # eigen-decompositions are much faster on a GPU); on the CPU when the GPU has no room for them.
            devices = [k_train.device, torch.device("cpu")] if k_train.device.type == "cuda" else [torch.device("cpu")]
            for device in devices:
                try:
                    train_grams[name] = k_train.to(device, torch.float64)
                    # the CPU retry keeps the SVM on the CPU too, whatever svm={"device": ...} asks for
                    retry = "cpu" if device.type == "cpu" and len(devices) > 1 else None
                    svm = self._fit_svm(name, epoch, train_grams[name], y_tr, k_test, y_te, device=retry)
                    t0 = time.perf_counter()
                    metrics = self._kernel_metrics(name, epoch, train_grams[name], y_tr)
                    break
                except torch.OutOfMemoryError as err:
                    if device.type != "cuda":
                        raise
                    train_grams.pop(name, None)
                    torch.cuda.empty_cache()
                    rank_zero_warn(
                        f"AfterKernelCallback: the {KERNEL_LABELS[name]} SVM and analyses at epoch {epoch} ran out of "
                        f"GPU memory ({str(err)[:160]}); doing them on the CPU."
                    )
            row.update(svm)
            row.update(metrics)
            row["analysis_time_s"] = time.perf_counter() - t0
            del k_test
            rows.append(row)
        if {"ntk", "ck"} <= set(self._active_kernels):
            align = cka = math.nan
            if {"ntk", "ck"} <= train_grams.keys():
                pair = (train_grams["ntk"], train_grams["ck"])
                if pair[0].device != pair[1].device:  # one of them fell back to the CPU
                    pair = (pair[0].cpu(), pair[1].cpu())
                align = self._metric("the NTK-CK alignment", epoch, kernel_alignment, *pair)
                cka = self._metric("the NTK-CK CKA", epoch, centered_kernel_alignment, *pair)
            for row in rows:
                row["alignment_ntk_ck"] = align
                row["cka_ntk_ck"] = cka
        families = self._invariance_families()
        if families:
            for row in rows:
                if "error" in row:
                    continue
                t0 = time.perf_counter()
                row.update(self._invariance(trainer, pl_module, row["kernel"], epoch, families))
                row["analysis_time_s"] += time.perf_counter() - t0
        self.results.extend(rows)
        self._log(trainer, rows)
        if trainer.global_step == 0 and self._initial_kernels:
            self._save_initial_kernels(pl_module)
        self._save(trainer)
        if self.figures and train_grams:
            self._draw_figures(trainer, epoch, train_grams, y_tr)

    def _metric(self, what: str, epoch: int | float, fn: Any, *args: Any) -> float:
        """``fn(*args)``, or NaN with a warning when the metric is undefined for these kernels."""
        try:
            return float(fn(*args))
        except KernelError as err:
            rank_zero_warn(f"AfterKernelCallback: {what} at epoch {epoch} is NaN: {err}")
            return math.nan

    def _kernel_metrics(self, name: str, epoch: int | float, k_train: Tensor, y_train: Tensor) -> dict[str, float]:
        """Alignment, CKA and relative distance to the epoch-0 kernel, kernel-target alignment, effective ranks."""
        label = KERNEL_LABELS[name]
        initial = self._initial_kernels.get(name)
        out = dict.fromkeys(("alignment_to_initial", "cka_to_initial", "distance_to_initial"), math.nan)
        if initial is not None:
            initial = initial.to(k_train.device, torch.float64)
            out["alignment_to_initial"] = self._metric(
                f"the {label} alignment to the initial kernel", epoch, kernel_alignment, k_train, initial
            )
            out["cka_to_initial"] = self._metric(
                f"the {label} CKA to the initial kernel", epoch, centered_kernel_alignment, k_train, initial
            )
            out["distance_to_initial"] = self._metric(
                f"the {label} distance to the initial kernel", epoch, kernel_distance, k_train, initial, "frobenius"
            )
        out["kta"] = self._metric(
            f"the {label} kernel-target alignment", epoch, kernel_target_alignment, k_train, y_train
        )
        spectrum = eigenspectrum(k_train)  # once per kernel and evaluation: both ranks and the figure use it
        self._spectra[name] = spectrum.cpu()
        out["effective_rank"] = self._metric(f"the {label} effective rank", epoch, effective_rank, spectrum, "trace")
        out["effective_rank_entropy"] = self._metric(
            f"the {label} entropy effective rank", epoch, effective_rank, spectrum, "entropy"
        )
        return out

    def _n_invariance(self) -> int:
        """Images the invariance scores are averaged over."""
        return min(self.n_invariance, self.n_test if self.invariance_images == "test" else self.n_train)

    def _invariance_families(self) -> tuple[str, ...]:
        """The paper's families the invariance images allow (decided once; a message for what is skipped)."""
        if self._families is not None:
            return self._families
        assert self._data is not None
        x = self._data[self.invariance_images][0]
        if self.n_invariance == 0:
            self._families = ()
        elif x.ndim != 4 or not x.is_floating_point():
            self._families = ()
            rank_zero_warn(
                f"AfterKernelCallback: the invariance scores are skipped because the inputs are not floating-point "
                f"image batches (n, C, H, W) (got shape {tuple(x.shape)}, dtype {x.dtype}); set n_invariance=0 to "
                "silence this."
            )
        elif x.shape[-2] % 2 or x.shape[-1] % 2:
            self._families = tuple(f for f in INVARIANCE_FAMILIES if f != "globalness")
            rank_zero_warn(
                f"AfterKernelCallback: the globalness score is skipped: the quadrant swap needs an even height and "
                f"width, the images are {x.shape[-2]} x {x.shape[-1]}."
            )
        else:
            self._families = INVARIANCE_FAMILIES
        return self._families

    def _invariance(
        self, trainer: pl.Trainer, model: pl.LightningModule, name: str, epoch: int | float, families: Sequence[str]
    ) -> dict[str, float]:
        assert self._data is not None
        x = self._data[self.invariance_images][0][: self.n_invariance]
        options: dict[str, Any] = dict(batch_size=self.kernel_batch_size, dtype=self.dtype, device=model.device)
        label = KERNEL_LABELS[name]
        try:
            if name == "ntk":
                options.update(implementation=self.implementation, memory_budget=self.memory_budget)
                with _KernelProgress(trainer, "after kernel: NTK invariance", enabled=self.progress) as progress:
                    scores = invariance_scores(model, x, families, kernel="ntk", progress=progress, **options)
            else:
                scores = invariance_scores(model, x, families, kernel="ck", **options)
        except KernelError as err:
            rank_zero_warn(f"AfterKernelCallback: the {label} invariance scores at epoch {epoch} are NaN: {err}")
            scores = dict.fromkeys(families, math.nan)
        return {f"invariance_{family}": scores[family] for family in families}

    def _fit_svm(
        self,
        name: str,
        epoch: int | float,
        k_train: Tensor,
        y_train: Tensor,
        k_test: Tensor,
        y_test: Tensor,
        device: str | None = None,
    ) -> dict[str, Any]:
        """The hard-margin SVM's results (or the soft-margin fallback's); ``device`` overrides ``svm["device"]``."""
        t0 = time.perf_counter()
        options = self.svm_kwargs if device is None else {**self.svm_kwargs, "device": device}
        try:
            svm = HardMarginSVM(**options).fit(k_train, y_train)
        except SolverError as err:  # NotSeparableError included: recorded, training goes on
            row = {
                "svm_test_acc": math.nan,
                "svm_min_margin": math.nan,
                "svm_n_support": -1,
                "svm_separable": 0,
                "svm_soft_test_acc": self._soft_margin_accuracy(k_train, y_train, k_test, y_test),
                "svm_time_s": time.perf_counter() - t0,
            }
            fallback = (
                ""
                if math.isnan(row["svm_soft_test_acc"])
                else (f" Soft-margin fallback (C={self.soft_margin_c}): test accuracy {row['svm_soft_test_acc']:.4f}.")
            )
            rank_zero_warn(
                f"AfterKernelCallback: no hard-margin SVM for the {name} kernel at epoch {epoch}: {err}{fallback}"
            )
            return row
        return {
            "svm_test_acc": float(svm.score(k_test, y_test)),
            "svm_min_margin": float(svm.min_margin_),
            "svm_n_support": int(svm.n_support_),
            "svm_separable": 1,
            "svm_soft_test_acc": math.nan,
            "svm_time_s": time.perf_counter() - t0,
        }

    def _soft_margin_accuracy(self, k_train: Tensor, y_train: Tensor, k_test: Tensor, y_test: Tensor) -> float:
        if self.soft_margin_c is None:
            return math.nan
        shared = {k: v for k, v in self.svm_kwargs.items() if k in ("fit_intercept", "normalize", "tol", "time_limit")}
        try:
            soft = SoftMarginSVM(C=self.soft_margin_c, **shared).fit(k_train, y_train)
        except SolverError as err:
            rank_zero_warn(f"AfterKernelCallback: the soft-margin fallback failed too: {err}")
            return math.nan
        return float(soft.score(k_test, y_test))

    def _log(self, trainer: pl.Trainer, rows: list[dict[str, Any]]) -> None:
        metrics: dict[str, float] = {f"{self._prefix}/epoch": float(rows[0]["epoch"])}
        metrics[f"{self._prefix}/network_test_acc"] = rows[0]["network_test_acc"]
        for row in rows:
            prefix = f"{self._prefix}/{row['kernel']}"
            for key in KERNEL_METRICS:
                metrics[f"{prefix}/{key}"] = float(row[key])
            if not math.isnan(row["svm_soft_test_acc"]):
                metrics[f"{prefix}/svm_soft_test_acc"] = row["svm_soft_test_acc"]
            for family in INVARIANCE_FAMILIES:
                if f"invariance_{family}" in row:
                    metrics[f"{prefix}/invariance/{family}"] = row[f"invariance_{family}"]
            for key in ("alignment_ntk_ck", "cka_ntk_ck"):
                if key in row:
                    metrics[f"{self._prefix}/{key}"] = row[key]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _draw_figures(self, trainer: pl.Trainer, epoch: int | float, grams: dict[str, Tensor], y_train: Tensor) -> None:
        """Redraw the PNGs after an evaluation and log them to W&B (rank 0 only, as :meth:`_evaluate`)."""
        assert self._dir is not None, "set in setup(stage='fit'), before anything is computed"
        folder = self._dir / FIGURES_DIRNAME
        spectra: dict[str, dict[int | float, Tensor]] = {}
        for name, gram in grams.items():
            spectra[name] = {epoch: self._spectra[name] if name in self._spectra else eigenspectrum(gram).cpu()}
            if epoch == 0 and trainer.global_step == 0:
                self._initial_spectra[name] = spectra[name][epoch]
            elif name in self._initial_kernels:
                if name not in self._initial_spectra:  # e.g. after resuming: once, from the side file
                    self._initial_spectra[name] = eigenspectrum(self._initial_kernels[name]).cpu()
                spectra[name][0] = self._initial_spectra[name]
        kernels = list(self._active_kernels)  # a kernel that failed this time keeps its earlier points in the curves
        tag = f"{epoch:g}"
        try:
            paths = {
                "kernel_heatmap": _figures.kernel_heatmaps(
                    folder / f"kernel_heatmap_epoch_{tag}.png", grams, y_train, epoch, KERNEL_LABELS, self._class_names
                ),
                "eigenspectrum": _figures.eigenspectra(
                    folder / f"eigenspectrum_epoch_{tag}.png", spectra, KERNEL_LABELS, self.n_train
                ),
                "accuracy": _figures.accuracy_curves(
                    folder / "accuracy.png", self.results, kernels, KERNEL_LABELS, self.n_train, self.n_test
                ),
            }
            families = self._invariance_families()
            if families:
                paths["invariance"] = _figures.invariance_curves(
                    folder / "invariance.png",
                    self.results,
                    families,
                    kernels,
                    KERNEL_LABELS,
                    self._n_invariance(),
                    self.invariance_images,
                )
        except OSError as err:
            rank_zero_warn(f"AfterKernelCallback: could not write the figures to {folder}: {err}")
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for key, path in paths.items():
                    logger.log_image(key=f"{self._prefix}/figures/{key}", images=[str(path)], step=trainer.global_step)

    def _save_kernels(
        self, trainer: pl.Trainer, name: str, epoch: int | float, k_train: Tensor, k_test: Tensor
    ) -> None:
        """``kernels/epoch_<e>_<kernel>.pt``, atomically; the format is in the class docstring."""
        assert self._dir is not None and self._data is not None
        model = trainer.lightning_module
        payload = {
            "format": KERNEL_FILE_FORMAT,
            "kernel": name,
            "epoch": epoch,
            "step": trainer.global_step,
            "k_train": k_train.detach().cpu(),
            "k_test": k_test.detach().cpu(),
            "y_train": self._data["train"][1].clone(),
            "y_test": self._data["test"][1].clone(),
            "train_indices": self._indices["train"].clone(),
            "test_indices": self._indices["test"].clone(),
            "seed": self.seed,
            "model": type(model).__name__,
            "hparams": _plain(dict(getattr(model, "hparams", {}))),
            "num_parameters": sum(p.numel() for p in model.parameters()),
        }
        path = self._dir / KERNELS_DIRNAME / f"epoch_{epoch:g}_{name}.pt"
        try:
            atomic_torch_save(payload, path)
        except OSError as err:
            rank_zero_warn(f"AfterKernelCallback: could not write {path}: {err}; the kernels are not saved.")

    @rank_zero_only
    def _log_table(self, trainer: pl.Trainer) -> None:
        """The whole results table, once, for loggers that take tables (W&B)."""
        columns = sorted({key for row in self.results for key in row})
        data = [[row.get(c, math.nan) for c in columns] for row in self.results]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=f"{self._prefix}/results", columns=columns, data=data)

    @staticmethod
    def _default_dir(trainer: pl.Trainer) -> Path:
        """The Trainer's log dir; for W&B (whose save_dir all runs share) a folder per run id."""
        root = Path(trainer.log_dir or trainer.default_root_dir)
        if isinstance(trainer.logger, WandbLogger):
            return root / "afterkernel" / str(trainer.logger.version)
        return root

    def _initial_kernels_path(self) -> Path:
        assert self._dir is not None, "set in setup(stage='fit'), before anything is computed"
        return self._dir / INITIAL_KERNELS_FILENAME

    def _save_initial_kernels(self, pl_module: pl.LightningModule | None = None) -> None:
        """The epoch-0 train kernels, and (at step 0) the epoch-0 weights beside them so that a lost or corrupt
        kernel file can be recomputed on resume."""
        path = self._initial_kernels_path()
        try:
            atomic_torch_save(self._initial_kernels, path)
            self._initial_file = str(path)
            if pl_module is not None:
                weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
                atomic_torch_save(weights, path.with_name(INITIAL_WEIGHTS_FILENAME))
                self._initial_weights_file = str(path.with_name(INITIAL_WEIGHTS_FILENAME))
        except OSError as err:
            rank_zero_warn(f"AfterKernelCallback: could not write {path}: {err}; a resumed run will lack them.")

    def _load_initial_kernels(self, path: Path) -> tuple[dict[str, Tensor], str]:
        """The valid kernels of the side file, and what is wrong with the rest ("" when nothing)."""
        try:
            loaded = torch.load(path, weights_only=True)
        except FileNotFoundError:
            return {}, f"{path} is missing"
        except Exception as err:  # truncated or garbled files fail in many ways
            return {}, f"{path} is unreadable ({type(err).__name__}: {str(err)[:200]})"
        if not isinstance(loaded, dict):
            return {}, f"{path} holds a {type(loaded).__name__}, not a dict of kernels"
        shape = (self.n_train, self.n_train)
        valid = {
            k: v
            for k, v in loaded.items()
            if k in KERNEL_LABELS and isinstance(v, Tensor) and v.shape == shape and bool(torch.isfinite(v).all())
        }
        bad = sorted(set(loaded) - set(valid))
        return valid, f"{path} has invalid entries {bad}" if bad else ""

    def _restore_initial_kernels(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rank 0 on resume: the epoch-0 kernels from the side file; the ones missing or corrupt there are
        recomputed from the saved epoch-0 weights (no collectives) and the file rewritten."""
        if self._initial_kernels:
            return
        wanted = sorted({r["kernel"] for r in self.results if r["step"] == 0 and "error" not in r})
        if not wanted:
            return
        if not self._initial_file:
            rank_zero_warn(
                "AfterKernelCallback: the checkpoint names no file of epoch-0 kernels, so alignment_to_initial is "
                "NaN from here on."
            )
            return
        path = Path(self._initial_file)
        kernels, problem = self._load_initial_kernels(path)
        missing = [k for k in wanted if k not in kernels]
        self._initial_kernels = kernels
        if not missing:
            return
        problem = problem or f"{path} lacks the {missing} kernels"
        weights_path = Path(self._initial_weights_file or path.with_name(INITIAL_WEIGHTS_FILENAME))
        try:
            weights = torch.load(weights_path, weights_only=True)
        except Exception as err:
            rank_zero_warn(
                f"AfterKernelCallback: {problem}, and the epoch-0 weights ({weights_path}) cannot be read "
                f"({type(err).__name__}), so alignment_to_initial of {missing} is NaN from here on."
            )
            return
        rank_zero_warn(f"AfterKernelCallback: {problem}; recomputing the epoch-0 {missing} kernels from {weights_path}")
        trained = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        try:
            pl_module.load_state_dict(weights)
            with _global_rng_untouched(pl_module.device):
                for name in missing:
                    k_train = self._compute_kernel(trainer, name, pl_module)[0]
                    self._initial_kernels[name] = k_train.to("cpu", torch.float32)
        except (KernelError, RuntimeError) as err:
            rank_zero_warn(f"AfterKernelCallback: recomputing the epoch-0 kernels failed ({err}); NaN alignments.")
        finally:
            pl_module.load_state_dict(trained)  # copies into the same tensors: bit-exact, the optimiser unaffected
        self._save_initial_kernels()

    def _check_results_file(self, trainer: pl.Trainer) -> tuple[list[dict[str, Any]], str | None]:
        """Rank 0 on resume: the results file must hold the checkpoint's rows; a corrupt, partial or stale one is
        rewritten from them. Rows the file holds beyond them were computed after the checkpoint was saved: those
        on the checkpoint's own weights (its step; e.g. the ``at_end`` evaluation, which runs after the last
        checkpoint) are kept and returned (the caller adds them to ``results`` on every rank); the others belong
        to weights the interruption lost and are dropped (scheduled epochs are computed again on the way). The
        second value says why the kept rows cannot join (their invariance scores are on other images); then
        nothing is taken in or rewritten, and the caller raises."""
        assert self._dir is not None
        path = self._dir / RESULTS_FILENAME
        expected = json.loads(json.dumps(finite_or_none(self.results)))
        adopted: list[dict[str, Any]] = []
        source = path  # a run resumed into a new folder (a new logger version or W&B run) reads the old file
        if self._results_file and not path.exists() and Path(self._results_file).exists():
            source = Path(self._results_file)
            rank_zero_info(f"AfterKernelCallback: resumed into a new folder; the results of {source} go on in {path}.")
        file_images = "train"  # results files from before the option scored training images
        try:
            payload = json.loads(source.read_text())
            saved = payload["results"]
            file_images = payload.get("invariance_images", "train")
        except FileNotFoundError:
            saved, problem = None, "is missing"
        except (OSError, ValueError, KeyError, TypeError) as err:
            saved, problem = None, f"is corrupt ({type(err).__name__}: {str(err)[:120]})"
        else:
            problem = "" if isinstance(saved, list) else "is corrupt (its results are not a list)"
            saved = saved if isinstance(saved, list) else None
        if saved is not None:
            if saved[: len(expected)] == expected:
                if len(saved) == len(expected):
                    if source != path:
                        self._save(trainer)
                    return adopted, None
                later = [r for r in saved[len(expected) :] if isinstance(r, dict)]
                step = trainer.global_step
                adopted = [_nan_for_none(r) for r in later if r.get("step") == step and r.get("kernel")]
                conflict = self._images_conflict(str(file_images), adopted, str(source))
                if conflict:
                    return [], conflict
                lost = sorted({r.get("epoch") for r in later if r.get("step") != step}, key=str)
                if adopted:
                    kept = sorted({r["epoch"] for r in adopted}, key=str)
                    rank_zero_info(
                        f"AfterKernelCallback: {source} has results for epochs {kept} computed after the checkpoint "
                        f"was saved, on its weights (step {step}): kept."
                    )
                if lost:
                    rank_zero_info(
                        f"AfterKernelCallback: {source} has results for epochs {lost} computed on weights after the "
                        "checkpoint, which the interruption lost: dropped (scheduled epochs are computed again "
                        "when training reaches them)."
                    )
                self.results.extend(adopted)
            else:
                problem = "does not match the checkpoint's results (partial or from another run)"
        if problem and self.results:
            rewrite = "rewriting it" if source == path else f"writing {path}"
            rank_zero_warn(f"AfterKernelCallback: {source} {problem}; {rewrite} from the checkpoint's results.")
        self._save(trainer)
        return adopted, None

    def _save(self, trainer: pl.Trainer) -> None:
        payload = {
            "n_train": self.n_train,
            "n_test": self.n_test,
            "seed": self.seed,
            "n_invariance": self._n_invariance() if self._invariance_families() else 0,
            "invariance_images": self.invariance_images,
            "invariance_families": list(self._invariance_families()),
            "kernels": self._active_kernels,
            "model": type(trainer.lightning_module).__name__,
            "results": self.results,
        }
        assert self._dir is not None, "set in setup(stage='fit'), before anything is computed"
        path = self._dir / RESULTS_FILENAME
        try:
            atomic_write_json(path, payload)
        except OSError as err:
            rank_zero_warn(f"AfterKernelCallback: could not write {path}: {err}; results stay in the logs.")

    # ---------------------------------------------------------------- reporting
    def summary_table(self) -> str:
        """Kernel x epoch -> SVM test accuracy, beside the network's own test accuracy, then the kernel analyses
        (kernel-target alignment, effective rank, change from the initial kernel, invariance scores), as text."""
        epochs = self.done_epochs
        by_key = {(r["epoch"], r["kernel"]): r for r in self.results}
        kernels = [k for k in self.kernels if any(r["kernel"] == k for r in self.results)]
        header = ["kernel"] + [f"epoch {e}" + (" (initial)" if e == 0 else "") for e in epochs]

        def pct(v: float) -> str:
            return f"{100 * v:.2f}%"

        def cell(row: dict[str, Any] | None) -> str:
            if row is None:
                return "-"
            if "error" in row:
                return "failed"
            if row["svm_separable"]:
                return pct(row["svm_test_acc"])
            soft = row.get("svm_soft_test_acc", math.nan)
            return "not separable" if math.isnan(soft) else f"{pct(soft)} (soft)"

        def number(row: dict[str, Any] | None, key: str, digits: int) -> str:
            value = math.nan if row is None else row.get(key, math.nan)
            return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"

        lines = []
        for k in kernels:
            lines.append([f"{KERNEL_LABELS[k]} SVM"] + [cell(by_key.get((e, k))) for e in epochs])
        net = {r["epoch"]: r["network_test_acc"] for r in self.results}
        lines.append(["network itself"] + [pct(net[e]) for e in epochs])
        analyses = [("kernel-target alignment", "kta", 3), ("effective rank", "effective_rank", 1)]
        analyses += [
            ("alignment to epoch 0", "alignment_to_initial", 3),
            ("change from epoch 0", "distance_to_initial", 3),
        ]
        families = [f for f in INVARIANCE_FAMILIES if any(f"invariance_{f}" in r for r in self.results)]
        analyses += [(family, f"invariance_{family}", 3) for family in families]
        extra = [
            [f"{KERNEL_LABELS[k]} {label}"] + [number(by_key.get((e, k)), key, digits) for e in epochs]
            for k in kernels
            for label, key, digits in analyses
        ]
        widths = [max(len(row[i]) for row in [header] + lines + extra) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        title = f"After-kernel summary: test accuracy on {self.n_test} test examples (SVM trained on {self.n_train})"
        table = [title, rule, fmt.format(*header), rule] + [fmt.format(*r) for r in lines] + [rule]
        table += [fmt.format(*r) for r in extra] + [rule]
        if any(not r["svm_separable"] for r in self.results):
            table.append(
                "(soft): no hard-margin SVM exists for that kernel; soft-margin SVM "
                f"(C={self.soft_margin_c}, normalised kernel) accuracy instead."
            )
        note = (
            f"Kernel analyses on the {self.n_train} training examples: kernel-target alignment y'Ky / (n ||K||), "
            "effective rank tr K / max eigenvalue, alignment <K, K0> / (||K|| ||K0||) and relative change "
            "||K - K0|| / ||K0|| from the epoch-0 kernel K0"
        )
        if families:
            images = f"{self._n_invariance()} {'test' if self.invariance_images == 'test' else 'training'} images"
            note += f"; invariance: mean kernel-space cosine between x and T(x) over {images}"
        table.append(note + ".")
        return "\n".join(table)

    @rank_zero_only
    def print_summary(self) -> None:
        print("\n" + self.summary_table(), flush=True)
