"""``AfterKernelCallback``: compute, judge and analyse the network's kernels at chosen epochs of ``fit``.

The callback is the Lightning hooks and the schedule: it decides *when* to evaluate. What an evaluation computes
lives in :mod:`~lightning_afterkernel.callbacks.evaluation` (plain functions over the model and the subsets), the
result row in :mod:`~lightning_afterkernel.callbacks.rows`, the rows' files and checkpoint state in
:mod:`~lightning_afterkernel.callbacks.record`, and where the data comes from in
:mod:`~lightning_afterkernel.callbacks.sources`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lightning_afterkernel.callbacks import _lightning
from lightning_afterkernel.callbacks._checks import (
    check_computation,
    check_invariance,
    check_kernels,
    check_model_and_labels,
    check_ntk_outputs,
    check_outputs,
    check_schedule,
    check_svm,
    usable_kernels,
)
from lightning_afterkernel.callbacks.evaluation import (
    Analysis,
    AnalysisOptions,
    KernelOptions,
    Kernels,
    Progress,
    Subsets,
    analyse,
    compute_kernels,
    initial_train_kernels,
    invariance_families,
)
from lightning_afterkernel.callbacks.outputs import (
    class_names,
    default_folder,
    draw_figures,
    log_evaluation,
    log_results_table,
)
from lightning_afterkernel.callbacks.progress import KernelProgress
from lightning_afterkernel.callbacks.record import RESULTS_FILENAME, RunRecord
from lightning_afterkernel.callbacks.rows import KernelName
from lightning_afterkernel.callbacks.sources import draw_subsets, global_rng_untouched, has_data
from lightning_afterkernel.callbacks.summary import summary_table
from lightning_afterkernel.errors import ConfigurationError, KernelError


class AfterKernelCallback(pl.Callback):
    """Compute the network's kernels at chosen epochs, judge each with a hard-margin SVM and analyse them.

    At every scheduled point the callback takes fixed, seeded subsets of the training and test data
    (``n_train``, ``n_test`` examples), computes for each requested kernel the train Gram matrix
    K(X_train, X_train) and the cross kernel K(X_test, X_train), fits
    :class:`~lightning_afterkernel.svm.HardMarginSVM` and analyses the kernel. It logs, per kernel, the metrics of
    a result row (:class:`~lightning_afterkernel.callbacks.rows.ResultRow`, which defines each) as
    ``afterkernel/<kernel>/<field>`` (``<kernel>`` = ``ntk``/``ck``): ``svm_test_acc``, ``svm_min_margin``,
    ``svm_n_support``, ``svm_separable``, ``alignment_to_initial``, ``cka_to_initial``, ``distance_to_initial``,
    ``kta``, ``effective_rank``, ``effective_rank_entropy`` and ``invariance/<family>`` for ``globalness``,
    ``shift``, ``rotation``, ``zoom``; plus ``afterkernel/alignment_ntk_ck``, ``afterkernel/cka_ntk_ck`` and
    ``afterkernel/network_test_acc`` (the network itself on the same test subset). ``ntk`` at epoch 0 is the
    *initial kernel*; later it is the *after kernel*. A metric that is undefined for a kernel (e.g. a CK with a zero
    feature vector) is NaN, with a warning; training goes on.

    Multi-class models (k logits per example, (n, k), labels 0..k-1) get the same rows and keys: the NTK of
    ``ntk_outputs``, one-vs-rest SVMs (``svm_n_support``: the union of the k problems' support vectors,
    ``svm_min_margin``: the smallest of their margins), the network's accuracy from the argmax of its logits, and
    the kernel-target alignment with centred one-hot targets.

    Outputs in the output folder (``dirpath``): ``afterkernel_results.json`` (every row),
    ``afterkernel_initial_kernels.pt`` (the epoch-0 train kernels, for resuming), with ``figures=True`` PNGs in
    ``figures/`` (``kernel_heatmap_epoch_<e>.png``, ``eigenspectrum_epoch_<e>.png``, ``invariance.png``,
    ``accuracy.png``; logged to W&B as ``afterkernel/figures/<name>`` when the Trainer has a
    :class:`~pytorch_lightning.loggers.WandbLogger`), and with ``save_kernels=True``
    ``kernels/epoch_<e>_<kernel>.pt`` (the Gram matrices, labels and subset positions of every evaluation;
    :mod:`~lightning_afterkernel.callbacks.record` lists the files' contents).

    Args:
        epochs: when to compute. 0 = at the start of fit, before any optimisation step; e > 0 =
            after e completed training epochs. Strictly increasing.
        at_end: also compute once training ends (if that point is not already in ``epochs``).
        kernels: any of ``"ntk"`` (empirical NTK) and ``"ck"`` (conjugate kernel; needs the model
            to define ``features(x)``, otherwise it is skipped with a message).
        ntk_outputs: the NTK of a model with k logits: ``"trace"`` (the sum over the logits of each logit's NTK) or
            an int c (the NTK of logit c, checked against k at fit start); one logit: its NTK either way.
            ``"full"`` (a (k, k) block per pair of examples) is refused: the SVMs and metrics need one value per
            pair.
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

    Data (:mod:`~lightning_afterkernel.callbacks.sources`): the datamodule's ``tensors(split)``, datasets or
    dataloaders, or the dataloaders given to ``fit``; any map-style dataset of ``(x, y)`` works, drawn without
    touching the global random state. At fit start, before any training step, the model must give one logit per
    example, (n,) or (n, 1), with labels 0 and 1 (or -1 and 1), or k logits, (n, k), with labels 0..k-1; the
    figures name the classes by the datamodule's ``class_names`` when it has them.

    DDP: every rank computes a share of the NTK and one all-reduce sums them; the rest is global rank 0's, and all
    ranks take the same decisions, so all enter the same collectives.

    Resuming (:mod:`~lightning_afterkernel.callbacks.record`): the rows and the epoch-0 weights live in the
    checkpoint, which resumes with every row wherever it was copied; a scheduled epoch whose weights a mid-epoch
    checkpoint skipped is announced as missed. A new fit from step 0 starts a new history.
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
        ntk_outputs: int | str = "trace",
    ) -> None:
        super().__init__()
        self.epochs = check_schedule(epochs, at_end)
        self.kernels = check_kernels(kernels)
        self.ntk_outputs = check_ntk_outputs(ntk_outputs)
        check_computation(n_train, n_test, dtype, kernel_batch_size, implementation, memory_budget)
        self.svm_kwargs = check_svm(svm, soft_margin_c)
        check_invariance(n_invariance, invariance_images)
        check_outputs(on_error, figures, save_kernels, name)
        self.at_end, self.n_train, self.n_test, self.seed = at_end, n_train, n_test, seed
        self.soft_margin_c, self.n_invariance, self.invariance_images = soft_margin_c, n_invariance, invariance_images
        self.kernel_batch_size, self.implementation = kernel_batch_size, implementation
        self.memory_budget, self.dtype = memory_budget, getattr(torch, dtype)
        self.progress, self.dirpath, self.verbose = progress, dirpath, verbose
        self.figures, self.save_kernels, self.on_error, self.name = figures, save_kernels, on_error, name
        self._prefix = "afterkernel" if name is None else f"afterkernel/{name}"
        self._kernel_options = KernelOptions(implementation, kernel_batch_size, memory_budget, self.dtype, ntk_outputs)
        self._dir: Path | None = None  # resolved in setup on every rank (log_dir is a collective under DDP)
        self._active_kernels = list(self.kernels)
        self._class_names: dict[int, str] = {}  # label -> class name for the figures, when the datamodule says
        self._logits = 1  # the model's logits per example, found at fit start
        self._started = False  # whether on_train_start ran in this fit
        self._start_history()

    def _start_history(self) -> None:
        """The state of one training history (a fit from step 0, and the fits that resume or continue it)."""
        self._record = RunRecord(
            n_train=self.n_train,
            n_test=self.n_test,
            seed=self.seed,
            invariance_images=self.invariance_images,
            n_invariance=self.n_invariance,
        )
        self._record.folder = self._dir
        self._subsets: Subsets | None = None
        self._progress: int | float | None = None  # epochs behind the weights at the last epoch end
        self._families: tuple[str, ...] | None = None  # invariance families the data allows, set at first use
        self._evaluated: set[tuple[int | float, int]] = set()  # (epoch, step) evaluated in this process, every rank

    @property
    def results(self) -> list[dict[str, Any]]:
        """One row per (epoch, kernel): :meth:`ResultRow.to_dict <lightning_afterkernel.callbacks.rows.ResultRow>`."""
        return self._record.results

    @property
    def state_key(self) -> str:
        # The schedule is left out on purpose: resuming with more epochs keeps what was computed.
        key = dict(kernels=self.kernels, n_train=self.n_train, n_test=self.n_test, seed=self.seed)
        if self.name is not None:  # left out when unset: checkpoints of unnamed callbacks keep their key
            key["name"] = self.name
        if self.ntk_outputs != "trace":  # likewise
            key["ntk_outputs"] = self.ntk_outputs
        return self._generate_state_key(**key)

    @property
    def done_epochs(self) -> list[int | float]:
        """Epochs of training behind each evaluation, ascending (fractional when training stopped mid-epoch)."""
        return self._record.done_epochs

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
            where = self._dir / RESULTS_FILENAME if self._dir else "its results file"
            rank_zero_info(
                f"AfterKernelCallback: a new fit starts at step 0; the {len(self.results)} results of the previous "
                f"fit stay in {where}, and this callback starts afresh."
            )
            self._start_history()
        self._started = False  # set at on_train_start, which Lightning skips when a resumed fit has nothing to train
        base = Path(self.dirpath) if self.dirpath else default_folder(trainer)
        self._dir = self._record.folder = base if self.name is None else base / self.name
        self._active_kernels = usable_kernels(pl_module, self.kernels)
        self._class_names = class_names(trainer.datamodule)
        if has_data(trainer):
            self._draw(trainer)  # sizes larger than the data fail before training
        if self.epochs and trainer.max_epochs not in (None, -1) and self.epochs[-1] > trainer.max_epochs:
            late = [e for e in self.epochs if e > trainer.max_epochs]
            rank_zero_warn(
                f"AfterKernelCallback: epochs {late} lie beyond max_epochs={trainer.max_epochs} and will not be "
                "computed; raise max_epochs or drop them."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._subsets is None:
            self._draw(trainer)
        self._logits = check_model_and_labels(pl_module, self._subsets, self.ntk_outputs)  # before any step or kernel
        self._started = True
        completed = trainer.current_epoch
        at_boundary = _lightning.at_epoch_boundary(trainer)
        if trainer.global_step > 0:
            self._resume(trainer, pl_module, completed, at_boundary)
            self._carry_end(trainer, pl_module)
        if at_boundary and completed in self.epochs and completed not in self._done()[0]:
            # epoch 0 on a fresh start; on resume, an epoch whose checkpoint was saved at the boundary before
            # this callback's epoch-end evaluation ran.
            self._evaluate(trainer, pl_module, epoch=completed)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Lightning also calls this hook when max_steps ends an epoch early: count what really ran.
        self._progress, partial = _lightning.epochs_trained(trainer)
        if not partial and self._progress in self.epochs and self._progress not in self._done()[0]:
            self._evaluate(trainer, pl_module, epoch=self._progress)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_end or self._subsets is None:
            return
        if trainer.global_step in self._done()[1]:
            return  # these very weights were already evaluated
        epoch = self._progress if self._progress is not None else trainer.current_epoch
        self._evaluate(trainer, pl_module, epoch=epoch)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 and not self._started:  # resumed where its fit had ended: nothing was trained
            self._resume_finished(trainer, pl_module)
        if not self.results:
            return
        log_results_table(trainer, self.results, self._prefix)
        if self.verbose:
            self.print_summary()

    def state_dict(self) -> dict[str, Any]:
        return self._record.state_dict()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # The at_end evaluation runs after the fit's last checkpoint, on its weights: the checkpoint says so, and a
        # resume that does not find that row (the results file is elsewhere) computes it again on the same weights.
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None:
            ends = self.at_end and _lightning.fit_ends_here(trainer)
            end = {"epoch": _lightning.epochs_trained(trainer)[0], "step": trainer.global_step}
            state["fit_end"] = end if ends else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._record.load_state_dict(state_dict)
        self._subsets = None  # re-drawn at the next on_train_start from the saved indices

    # ---------------------------------------------------------------- fit start
    def _draw(self, trainer: pl.Trainer) -> None:
        self._subsets, self._record.indices = draw_subsets(
            trainer, self.n_train, self.n_test, self.seed, self._record.indices
        )

    def _resume(self, trainer: pl.Trainer, pl_module: pl.LightningModule, completed: int, at_boundary: bool) -> None:
        """A fit resumed from a checkpoint: the record reconciled with its files, and the scheduled epochs whose
        weights are gone announced."""
        self._record.resume(
            trainer, self._header(pl_module), lambda w, names: self._initial_kernels(pl_module, w, names)
        )
        gone = [e for e in self.epochs if e < completed or (e == completed and not at_boundary)]
        missed = [e for e in gone if e not in self.done_epochs]
        if missed:
            rank_zero_warn(
                f"AfterKernelCallback: resuming at step {trainer.global_step} (epoch {completed}); scheduled "
                f"epochs {missed} have no saved results (the checkpoint holds none for them) and their weights "
                "are gone, so they are skipped."
            )

    def _carry_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The at_end row of the fit the checkpoint comes from, computed after it on exactly these weights: when the
        resume did not bring it (its results file moved or lost), it is computed again."""
        end = self._record.fit_end
        if end is not None and end["step"] == trainer.global_step and end["step"] not in self._done()[1]:
            self._evaluate(trainer, pl_module, epoch=end["epoch"])

    def _resume_finished(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A resume where the checkpoint's fit had ended (no larger max_epochs): Lightning runs no training hook, so
        the resume is reconciled here, on the checkpoint's weights, moved back to the Trainer's device for it (its
        teardown has moved them to the CPU)."""
        pl_module.to(trainer.strategy.root_device)
        try:
            if self._subsets is None:
                self._draw(trainer)
            self._logits = check_model_and_labels(pl_module, self._subsets, self.ntk_outputs)
            self._resume(trainer, pl_module, trainer.current_epoch, at_boundary=True)
            self._carry_end(trainer, pl_module)
        finally:
            pl_module.cpu()

    def _initial_kernels(self, pl_module: pl.LightningModule, weights: Any, names: list[str]) -> dict[str, Any]:
        assert self._subsets is not None
        with global_rng_untouched(pl_module.device):
            return initial_train_kernels(pl_module, weights, self._subsets, names, self._kernel_options)

    # ---------------------------------------------------------------- evaluation
    def _display(self, trainer: pl.Trainer) -> Progress:
        return lambda label: KernelProgress(trainer, label, enabled=self.progress)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int | float = 0) -> None:
        """One evaluation. Every rank runs it (the same decisions on every rank: see :meth:`_done`): the kernels on
        every rank, the analyses, logs and files on rank 0. The global RNGs are left as they were (e.g.
        scikit-learn's SVC, or a user's model)."""
        assert self._subsets is not None
        with global_rng_untouched(pl_module.device):
            self._evaluated.add((epoch, trainer.global_step))
            kernels = compute_kernels(
                pl_module,
                self._subsets,
                self._active_kernels,
                self._kernel_options,
                epoch=epoch,
                shard=_lightning.ntk_shard(trainer),
                progress=self._display(trainer),
            )
            self._judge(kernels)
            if trainer.global_rank == 0:
                self._analyse(trainer, pl_module, epoch, kernels)

    def _judge(self, kernels: Kernels) -> None:
        """A failed stage stops training (``on_error="raise"``, unless it only ran out of memory) or is recorded."""
        if not kernels.failures:
            return
        message = "; ".join(dict.fromkeys(m.rstrip(". ") for m in kernels.failures.values()))
        if self.on_error == "raise" and not set(kernels.failures) <= kernels.out_of_memory:
            raise KernelError(
                f"AfterKernelCallback: {message}. Set on_error='warn' to record the failure (NaN metrics) "
                "and keep training."
            )
        rank_zero_warn(f"AfterKernelCallback: {message}; recorded as failed (NaN metrics), training goes on.")

    def _analyse(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int | float, kernels: Kernels
    ) -> None:
        """Rank 0's part of an evaluation: SVMs, analyses, logs, files and figures (no collectives)."""
        assert self._subsets is not None
        record, step = self._record, trainer.global_step
        if self.save_kernels:
            for name, (k_train, k_test, _) in kernels.grams.items():
                record.save_kernels(name, epoch, step, k_train, k_test, self._subsets, pl_module)
        if step == 0:
            record.keep_initial(kernels.grams)
        families = self._invariance_families()
        options = AnalysisOptions(
            self.svm_kwargs,
            self.soft_margin_c,
            families,
            self.n_invariance,
            self.invariance_images,
            self._classes,
            self.figures,
        )
        analysis = analyse(
            pl_module,
            self._subsets,
            kernels,
            self._active_kernels,
            epoch=epoch,
            step=step,
            initial=record.initial_kernels,
            options=options,
            kernel_options=self._kernel_options,
            progress=self._display(trainer),
        )
        record.add(analysis.rows)
        log_evaluation(trainer, analysis.rows, self._prefix)
        if step == 0 and record.initial_kernels:
            record.save_initial(pl_module)
        record.save(self._header(pl_module))
        if self.figures and analysis.grams:
            self._draw_figures(trainer, epoch, analysis)

    def _header(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        families, kernels = self._invariance_families(), self._active_kernels
        return self._record.header(families, kernels, pl_module, self._logits, self.ntk_outputs)

    @property
    def _classes(self) -> int | None:
        """k for a model with k logits (its classes' centred one-hot targets); None for one logit."""
        return None if self._logits == 1 else self._logits

    def _invariance_families(self) -> tuple[str, ...]:
        """The paper's families the invariance images allow (decided once; a message for what is skipped)."""
        if self._families is None:
            assert self._subsets is not None
            images = self._subsets.images(self.invariance_images)
            self._families, message = invariance_families(images, self.n_invariance)
            if message:
                rank_zero_warn(f"AfterKernelCallback: {message}")
        return self._families

    # ---------------------------------------------------------------- outputs
    def _draw_figures(self, trainer: pl.Trainer, epoch: int | float, analysis: Analysis) -> None:
        assert self._dir is not None and self._subsets is not None
        draw_figures(
            trainer,
            self._dir,
            self._prefix,
            epoch,
            analysis.grams,
            self._record.figure_spectra(epoch, trainer.global_step, analysis.spectra),
            self.results,
            list(self._active_kernels),  # a kernel that failed this time keeps its earlier points in the curves
            labels=self._subsets.y_train,
            class_names=self._class_names,
            n_train=self.n_train,
            n_test=self.n_test,
            families=self._invariance_families(),
            n_invariance=self._record.n_scored,
            images=self.invariance_images,
        )

    # ---------------------------------------------------------------- reporting
    def summary_table(self) -> str:
        """Kernel x epoch -> SVM test accuracy, beside the network's own test accuracy, then the kernel analyses
        (kernel-target alignment, effective rank, change from the initial kernel, invariance scores), as text."""
        return summary_table(
            self.results,
            self.kernels,
            n_train=self.n_train,
            n_test=self.n_test,
            soft_margin_c=self.soft_margin_c,
            n_invariance=self._record.n_scored,
            invariance_images=self.invariance_images,
            num_classes=self._classes,
        )

    @rank_zero_only
    def print_summary(self) -> None:
        print("\n" + self.summary_table(), flush=True)
