"""The run record: the result rows of one training history, the files that hold them, and the checkpoint state.

Files in the callback's output folder (written on global rank 0, each atomically: temporary file, then
``os.replace``):

- ``afterkernel_results.json``: the settings and every row (:class:`~lightning_afterkernel.callbacks.rows.ResultRow`;
  strict JSON, NaN written as null), rewritten after every evaluation;
- ``afterkernel_initial_kernels.pt``: the epoch-0 train kernels (n_train^2 floats each), for the alignment with the
  initial kernel after a resume; ``afterkernel_initial_weights.pt``: the epoch-0 weights beside them, so that kernels
  missing or corrupt in that file are recomputed;
- with ``save_kernels=True``, ``kernels/epoch_<e>_<kernel>.pt`` (:data:`KERNEL_FILE_FORMAT`, keys in
  :meth:`RunRecord.save_kernels`).

Resuming (``ckpt_path``): the rows live in the checkpoint; the results file is checked against them and rewritten
when corrupt, partial or missing. Rows the file holds beyond the checkpoint's are kept when they were computed on
the checkpoint's own weights (its step: e.g. the ``at_end`` row, computed after the last checkpoint) and dropped
otherwise (their weights were lost; scheduled epochs are computed again on the way). The checkpoint names the
epoch-0 files and the results file where they are, so a resumed run whose log folder is new (a new logger version
or W&B run) still finds them, resume after resume.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_afterkernel._io import atomic_torch_save, atomic_write_json, finite_or_none
from lightning_afterkernel.callbacks.evaluation import Subsets, spectrum
from lightning_afterkernel.callbacks.rows import INVARIANCE_PREFIX, KERNEL_LABELS, ResultRow
from lightning_afterkernel.errors import ConfigurationError, KernelError

RESULTS_FILENAME = "afterkernel_results.json"
INITIAL_KERNELS_FILENAME = "afterkernel_initial_kernels.pt"
INITIAL_WEIGHTS_FILENAME = "afterkernel_initial_weights.pt"
KERNELS_DIRNAME = "kernels"
KERNEL_FILE_FORMAT = 1
"""Version of the dict in ``kernels/epoch_<e>_<kernel>.pt``."""


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


class RunRecord:
    """What one training history keeps: its rows, the subset indices, the epoch-0 kernels, and where the files are.

    ``folder`` is set by the callback at setup (every rank); the files are written by global rank 0 only.
    """

    def __init__(self, *, n_train: int, n_test: int, seed: int, invariance_images: str, n_invariance: int) -> None:
        self.n_train, self.n_test, self.seed = n_train, n_test, seed
        self.invariance_images, self.n_invariance = invariance_images, n_invariance
        self.folder: Path | None = None
        self.results: list[dict[str, Any]] = []
        self.indices: dict[str, Tensor] = {}
        self.initial_kernels: dict[str, Tensor] = {}
        self.initial_weights: dict[str, Tensor] | None = None  # the model's state dict at step 0 (checkpointed)
        self.initial_spectra: dict[str, Tensor] = {}  # eigenvalues of the epoch-0 kernels, for the figures
        # Where the epoch-0 kernels and weights are (written by this history, or named by a restored checkpoint:
        # a resumed run in a new log folder keeps pointing at the files of the run that wrote them).
        self.initial_file: str | None = None
        self.initial_weights_file: str | None = None
        self.results_file: str | None = None  # the results file of the run a restored checkpoint comes from
        self.saved_images = invariance_images  # the images a restored checkpoint's scores are on
        # {"epoch", "step"} of the at_end evaluation a restored checkpoint's fit ran on its weights, after saving it
        self.fit_end: dict[str, Any] | None = None

    @property
    def n_scored(self) -> int:
        """Images the invariance scores are averaged over."""
        return min(self.n_invariance, self.n_test if self.invariance_images == "test" else self.n_train)

    def header(
        self,
        families: Sequence[str],
        kernels: Sequence[str],
        model: nn.Module,
        logits: int = 1,
        ntk_outputs: str | int = "trace",
    ) -> dict[str, Any]:
        """The settings at the top of the results file: the invariance ``families`` scored, the ``kernels``
        computed and the model's class; for a model with k > 1 ``logits``, k and the NTK's ``ntk_outputs``."""
        header = {
            "n_train": self.n_train,
            "n_test": self.n_test,
            "seed": self.seed,
            "n_invariance": self.n_scored if families else 0,
            "invariance_images": self.invariance_images,
            "invariance_families": list(families),
            "kernels": list(kernels),
            "model": type(model).__name__,
        }
        if logits > 1:
            header.update(logits=logits, ntk_outputs=ntk_outputs)
        return header

    # ---------------------------------------------------------------- rows
    @property
    def done_epochs(self) -> list[int | float]:
        """Epochs of training behind each evaluation, ascending."""
        return sorted({row["epoch"] for row in self.results})

    def add(self, rows: Sequence[ResultRow]) -> None:
        self.results.extend(row.to_dict() for row in rows)

    def keep_initial(self, grams: Mapping[str, tuple[Tensor, ...]]) -> None:
        """At global step 0: the train kernels of the first evaluation are the epoch-0 kernels (only ever taken at
        step 0, so a run resumed without this callback's state never calls trained weights "initial")."""
        for name, (k_train, *_) in grams.items():
            self.initial_kernels.setdefault(name, k_train.to("cpu", torch.float32))

    def initial_spectrum(self, name: str) -> Tensor | None:
        """The eigenvalues of the epoch-0 kernel ``name`` (computed once, e.g. after resuming), None without it."""
        if name not in self.initial_spectra and name in self.initial_kernels:
            self.initial_spectra[name] = spectrum(self.initial_kernels[name]).cpu()
        return self.initial_spectra.get(name)

    def figure_spectra(
        self, epoch: int | float, step: int, spectra: Mapping[str, Tensor]
    ) -> dict[str, dict[int | float, Tensor]]:
        """Per kernel, the eigenvalues of an evaluation (``spectra``) and those of the epoch-0 kernel, for the
        eigen-spectrum figure; at step 0 the evaluation's are the epoch-0 ones."""
        out: dict[str, dict[int | float, Tensor]] = {}
        for name, eigenvalues in spectra.items():
            out[name] = {epoch: eigenvalues}
            if epoch == 0 and step == 0:
                self.initial_spectra[name] = eigenvalues
            elif (initial := self.initial_spectrum(name)) is not None:  # e.g. after resuming: computed once
                out[name][0] = initial
        return out

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        # The epoch-0 kernels (n_train^2 each) live in a side file, not in every checkpoint.
        return {
            "results": [dict(r) for r in self.results],
            "indices": {k: v.cpu() for k, v in self.indices.items()},
            "initial_kernels_file": self.initial_file if self.initial_kernels else None,
            "initial_weights_file": self.initial_weights_file,
            "initial_weights": self.initial_weights,
            "results_file": str(self.folder / RESULTS_FILENAME) if self.folder is not None else None,
            "invariance_images": self.invariance_images,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.results = [dict(r) for r in state_dict.get("results", [])]
        self.indices = dict(state_dict.get("indices", {}))
        self.initial_file = state_dict.get("initial_kernels_file")
        # Checkpoints written before the weights' path was recorded: the weights lie beside the kernels.
        beside = str(Path(self.initial_file).with_name(INITIAL_WEIGHTS_FILENAME)) if self.initial_file else None
        self.initial_weights_file = state_dict.get("initial_weights_file", beside)
        self.initial_weights = state_dict.get("initial_weights")  # None in checkpoints from before they were kept
        self.fit_end = state_dict.get("fit_end")  # added by the callback's on_save_checkpoint
        self.results_file = state_dict.get("results_file")
        # checked when a fit resumes, not here: validate/test load the state too
        self.saved_images = state_dict.get("invariance_images", "train")  # older checkpoints: training images

    def images_conflict(self, saved: str, rows: Sequence[Mapping[str, Any]], where: str) -> str | None:
        """Why ``rows`` (invariance scores on ``saved`` images) cannot join these results, or None."""
        scored = any(key.startswith(INVARIANCE_PREFIX) for row in rows for key in row)
        if self.n_invariance == 0 or not scored or saved == self.invariance_images:
            return None
        return (
            f"AfterKernelCallback: the invariance scores in {where} were computed on "
            f"{'training' if saved == 'train' else saved} images, and this callback has "
            f"invariance_images={self.invariance_images!r}: its curves would mix the two. Resume with "
            f"invariance_images={saved!r}, or start a new run."
        )

    # ---------------------------------------------------------------- files
    def _path(self, name: str) -> Path:
        assert self.folder is not None, "set in setup(stage='fit'), before anything is computed"
        return self.folder / name

    def save(self, header: Mapping[str, Any]) -> None:
        """``afterkernel_results.json``: ``header`` (the settings) and the rows."""
        path = self._path(RESULTS_FILENAME)
        try:
            atomic_write_json(path, {**header, "results": self.results})
        except OSError as err:
            rank_zero_warn(f"AfterKernelCallback: could not write {path}: {err}; results stay in the logs.")

    def save_initial(self, model: nn.Module | None = None) -> None:
        """The epoch-0 train kernels, and the epoch-0 weights beside them (taken from ``model`` at step 0; they also
        go into the checkpoint state, so that kernels missing or corrupt in the side file are recomputed on resume,
        wherever the checkpoint was moved)."""
        if model is not None:
            self.initial_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        path = self._path(INITIAL_KERNELS_FILENAME)
        try:
            atomic_torch_save(self.initial_kernels, path)
            self.initial_file = str(path)
            if self.initial_weights is not None:
                atomic_torch_save(self.initial_weights, path.with_name(INITIAL_WEIGHTS_FILENAME))
                self.initial_weights_file = str(path.with_name(INITIAL_WEIGHTS_FILENAME))
        except OSError as err:
            rank_zero_warn(f"AfterKernelCallback: could not write {path}: {err}; a resumed run will recompute them.")

    def save_kernels(
        self,
        name: str,
        epoch: int | float,
        step: int,
        k_train: Tensor,
        k_test: Tensor,
        subsets: Subsets,
        model: nn.Module,
    ) -> None:
        """``kernels/epoch_<e>_<kernel>.pt``: a dict for ``torch.load(path, weights_only=True)`` with ``format``,
        ``kernel``, ``epoch``, ``step``, ``k_train`` (n_train, n_train) and ``k_test`` (n_test, n_train) in the
        computation dtype, ``y_train``, ``y_test``, ``train_indices``, ``test_indices``, ``seed``, ``model`` (class
        name), ``hparams`` (plain values) and ``num_parameters``."""
        payload = {
            "format": KERNEL_FILE_FORMAT,
            "kernel": name,
            "epoch": epoch,
            "step": step,
            "k_train": k_train.detach().cpu(),
            "k_test": k_test.detach().cpu(),
            "y_train": subsets.y_train.clone(),
            "y_test": subsets.y_test.clone(),
            "train_indices": self.indices["train"].clone(),
            "test_indices": self.indices["test"].clone(),
            "seed": self.seed,
            "model": type(model).__name__,
            "hparams": _plain(dict(getattr(model, "hparams", {}))),
            "num_parameters": sum(p.numel() for p in model.parameters()),
        }
        path = self._path(KERNELS_DIRNAME) / f"epoch_{epoch:g}_{name}.pt"
        try:
            atomic_torch_save(payload, path)
        except OSError as err:
            rank_zero_warn(f"AfterKernelCallback: could not write {path}: {err}; the kernels are not saved.")

    # ---------------------------------------------------------------- resume
    def resume(
        self,
        trainer: pl.Trainer,
        header: Mapping[str, Any],
        recompute: Callable[[Mapping[str, Tensor], list[str]], dict[str, Tensor]],
    ) -> None:
        """A fit resumed from a checkpoint, on every rank: the invariance images of the checkpoint's rows checked
        (a :class:`ConfigurationError` before anything is computed, on every rank), the rows against the results file
        (rank 0, which tells the other ranks the rows it kept, so that all take the same decisions), and the epoch-0
        kernels restored (rank 0; see :meth:`restore_initial_kernels`)."""
        conflict = self.images_conflict(self.saved_images, self.results, "the checkpoint")
        if conflict:
            raise ConfigurationError(conflict)
        adopted, conflict = [], None
        if trainer.is_global_zero:
            adopted, conflict = self.reconcile_results_file(trainer.global_step, header)
        adopted, conflict = trainer.strategy.broadcast((adopted, conflict), src=0)
        if conflict:
            raise ConfigurationError(conflict)
        if trainer.is_global_zero:
            self.restore_initial_kernels(recompute)
        else:
            self.results.extend(adopted)

    def reconcile_results_file(self, step: int, header: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
        """Rank 0 on resume: the results file must hold the checkpoint's rows; a corrupt, partial or stale one is
        rewritten from them. Rows the file holds beyond them were computed after the checkpoint was saved: those on
        the checkpoint's own weights (``step``; e.g. the ``at_end`` evaluation, which runs after the last checkpoint)
        are kept and returned (the caller adds them to ``results`` on every rank); the others belong to weights the
        interruption lost and are dropped (scheduled epochs are computed again on the way). The second value says
        why the kept rows cannot join (their invariance scores are on other images); then nothing is taken in or
        rewritten, and the caller raises."""
        path = self._path(RESULTS_FILENAME)
        expected = json.loads(json.dumps(finite_or_none(self.results)))
        source = path  # a run resumed into a new folder (a new logger version or W&B run) reads the old file
        if self.results_file and not path.exists() and Path(self.results_file).exists():
            source = Path(self.results_file)
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
        adopted: list[dict[str, Any]] = []
        if saved is not None:
            if saved[: len(expected)] == expected:
                if len(saved) == len(expected):
                    if source != path:
                        self.save(header)
                    return adopted, None
                later = [r for r in saved[len(expected) :] if isinstance(r, dict)]
                adopted = [_nan_for_none(r) for r in later if r.get("step") == step and r.get("kernel")]
                conflict = self.images_conflict(str(file_images), adopted, str(source))
                if conflict:
                    return [], conflict
                self._announce(source, step, adopted, later)
                self.results.extend(adopted)
            else:
                problem = "does not match the checkpoint's results (partial or from another run)"
        if problem and self.results:
            rewrite = "rewriting it" if source == path else f"writing {path}"
            rank_zero_warn(f"AfterKernelCallback: {source} {problem}; {rewrite} from the checkpoint's results.")
        self.save(header)
        return adopted, None

    @staticmethod
    def _announce(source: Path, step: int, adopted: list[dict[str, Any]], later: list[dict[str, Any]]) -> None:
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

    def restore_initial_kernels(
        self, recompute: Callable[[Mapping[str, Tensor], list[str]], dict[str, Tensor]]
    ) -> None:
        """On resume: the epoch-0 kernels from the side file; those missing or corrupt there (e.g. the checkpoint was
        moved to another folder or machine) are recomputed by ``recompute(epoch-0 weights, names)`` (no
        collectives) and the side files written again."""
        if self.initial_kernels:
            return
        wanted = sorted({r["kernel"] for r in self.results if r["step"] == 0 and "error" not in r})
        if not wanted:
            return
        if self.initial_file:
            kernels, problem = self._load_initial_kernels(Path(self.initial_file))
        else:
            kernels, problem = {}, "the checkpoint names no file of epoch-0 kernels"
        missing = [k for k in wanted if k not in kernels]
        self.initial_kernels = kernels
        if not missing:
            return
        problem = problem or f"{self.initial_file} lacks the {missing} kernels"
        weights, source = self._epoch_0_weights(problem, missing)
        if weights is None:
            return
        rank_zero_warn(f"AfterKernelCallback: {problem}; recomputing the epoch-0 {missing} kernels from {source}")
        try:
            self.initial_kernels.update(recompute(weights, missing))
        except (KernelError, RuntimeError) as err:
            rank_zero_warn(f"AfterKernelCallback: recomputing the epoch-0 kernels failed ({err}); NaN alignments.")
        self.save_initial()

    def _epoch_0_weights(self, problem: str, missing: list[str]) -> tuple[Mapping[str, Tensor] | None, str]:
        """The epoch-0 weights and where they come from: the checkpoint's own; for checkpoints written before they
        were kept there, the side file (None, with a warning, when it cannot be read)."""
        if self.initial_weights is not None:
            return self.initial_weights, "the checkpoint's epoch-0 weights"
        path = Path(self.initial_weights_file or Path(self.initial_file or ".").with_name(INITIAL_WEIGHTS_FILENAME))
        try:
            weights = torch.load(path, weights_only=True)
        except Exception as err:
            rank_zero_warn(
                f"AfterKernelCallback: {problem}, and the epoch-0 weights are not in the checkpoint (written before "
                f"they were kept there) and {path} cannot be read ({type(err).__name__}), so alignment_to_initial of "
                f"{missing} is NaN from here on."
            )
            return None, ""
        self.initial_weights = weights
        return weights, str(path)
