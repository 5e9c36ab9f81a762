"""The evaluation as plain functions: the kernels of the subsets, then their SVMs and analyses.

No Trainer is needed: a model (any module returning one logit per example, or k logits: (n, k)), the
:class:`Subsets` and options go in, values come out. With k logits the NTK is that of ``KernelOptions.outputs``
(``"trace"``: the sum of the logits' kernels; c: logit c's), the SVMs are one-vs-rest, the network's prediction is
the argmax of its logits and the kernel-target alignment has centred one-hot targets.

:func:`compute_kernels` is the part every rank runs: the network's outputs, the NTK (under DDP each rank computes a
cost-balanced share, ``shard=(rank, world_size)`` of
:func:`~lightning_afterkernel.kernels.empirical_ntk_train_test`, and one all-reduce sums them into the exact kernel
on every rank) and the CK (rank 0); failures are returned by stage, and under DDP every rank learns which stages
failed anywhere (one small all-reduce), so all ranks take the same path through the collectives. The :func:`analyse`
part is rank 0's and uses no collectives: the hard-margin SVM with its soft-margin fallback, the metrics, the NTK-CK
comparison and the invariance scores, in float64 where the kernel is (redone on the CPU when a GPU has no room for
them).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_afterkernel.callbacks.rows import INVARIANCE_FAMILIES, KERNEL_LABELS, ResultRow
from lightning_afterkernel.errors import KernelError, SolverError
from lightning_afterkernel.invariance import invariance_scores
from lightning_afterkernel.kernels import (
    centered_kernel_alignment,
    conjugate_kernel,
    effective_rank,
    eigenspectrum,
    empirical_ntk_train_test,
    eval_mode,
    kernel_alignment,
    kernel_distance,
    kernel_target_alignment,
)
from lightning_afterkernel.kernels.metrics import ENTROPY_RANK_MAX_N
from lightning_afterkernel.svm import HardMarginSVM, SoftMarginSVM

ProgressCallback = Callable[[int, int], None]
Progress = Callable[[str], AbstractContextManager[ProgressCallback | None]]
"""A progress display: called with a label, it gives a context whose value is a callable ``(done, total)`` (or
None for no display)."""


def no_progress(label: str) -> AbstractContextManager[None]:
    """The :data:`Progress` that shows nothing."""
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Subsets:
    """The fixed kernel subsets: the SVM trains on (x_train, y_train) and is tested on (x_test, y_test)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def images(self, which: str) -> Tensor:
        """The inputs of the ``"train"`` or ``"test"`` subset."""
        return self.x_train if which == "train" else self.x_test


@dataclass(frozen=True)
class KernelOptions:
    """How the kernels are computed (see :func:`~lightning_afterkernel.kernels.empirical_ntk`; ``outputs``: which
    NTK of a model with k logits, ``"trace"`` or a logit index)."""

    implementation: str = "auto"
    batch_size: int | None = None
    memory_budget: int | str | None = None
    dtype: torch.dtype = torch.float32
    outputs: str | int = "trace"


@dataclass(frozen=True)
class AnalysisOptions:
    """What is done with the kernels: the SVMs and the invariance scores."""

    svm: Mapping[str, Any] = field(default_factory=dict)  # HardMarginSVM options
    soft_margin_c: float | None = 1.0  # C of the soft-margin fallback; None: no fallback
    families: tuple[str, ...] = ()  # invariance families scored (empty: none)
    n_invariance: int = 0  # images the scores average over
    invariance_images: str = "test"  # whose: the "test" or the "train" subset's
    num_classes: int | None = None  # k for a model with k logits (centred one-hot targets); None: one logit
    figures: bool = True  # whether the spectrum figure is drawn (above ENTROPY_RANK_MAX_N only it needs the top)


@dataclass
class Kernels:
    """An evaluation's kernels, the same decisions on every rank: the network's logits on the test subset, (n,) or
    (n, k) (None when not finite), per kernel (K(train, train), K(test, train), seconds), and the failed stages
    (``"network"`` or a kernel name) with their messages; ``out_of_memory`` are the failures that ran out of
    memory."""

    logits: Tensor | None
    grams: dict[str, tuple[Tensor, Tensor, float]]
    failures: dict[str, str]
    out_of_memory: set[str] = field(default_factory=set)


@dataclass
class Analysis:
    """Rank 0's results of an evaluation: one row per kernel, and the float64 train Gram matrices and their
    eigenvalues (for the figures)."""

    rows: list[ResultRow]
    grams: dict[str, Tensor]
    spectra: dict[str, Tensor]


# ---------------------------------------------------------------- kernels (every rank)
def network_logits(model: nn.Module, x: Tensor, epoch: int | float) -> Tensor:
    """The network's logits on ``x`` (eval mode, no grad, on the CPU): (n,) for one logit per example, (n, k) for k;
    a :class:`KernelError` when they are not finite."""
    param = next(model.parameters())
    with torch.no_grad(), eval_mode(model):
        inputs = x.to(param.device, param.dtype if x.is_floating_point() else x.dtype)
        out = model(inputs)
        logits = (out.reshape(-1) if out.ndim == 1 or out.shape[1] == 1 else out).float().cpu()
    bad = int((~torch.isfinite(logits.reshape(len(logits), -1))).any(1).sum())
    if bad:
        raise KernelError(
            f"the network's outputs at epoch {epoch} are not finite on {bad} of the {len(logits)} kernel test "
            "examples (nan or inf: diverged training?), so neither kernel can be computed; lower the learning "
            "rate or check the model."
        )
    return logits


def compute_kernel(
    model: nn.Module,
    name: str,
    subsets: Subsets,
    options: KernelOptions,
    *,
    shard: tuple[int, int] | None = None,
    progress: Progress = no_progress,
) -> tuple[Tensor, Tensor]:
    """K(train, train) and K(test, train) of kernel ``name`` in ``options.dtype`` on the model's device; with
    ``shard``, this rank's share of the NTK (zeros elsewhere)."""
    device = next(model.parameters()).device
    common = dict(batch_size=options.batch_size, dtype=options.dtype, device=device)
    if name == "ntk":
        with progress("after kernel: NTK") as report:
            k_train, k_test = empirical_ntk_train_test(
                model,
                subsets.x_train,
                subsets.x_test,
                outputs=options.outputs,
                implementation=options.implementation,
                memory_budget=options.memory_budget,
                progress=report,
                shard=shard,
                **common,
            )
    else:
        k_train = conjugate_kernel(model, subsets.x_train, **common)
        k_test = conjugate_kernel(model, subsets.x_test, subsets.x_train, **common)
    return k_train.detach(), k_test.detach()


def initial_train_kernels(
    model: nn.Module, weights: Mapping[str, Tensor], subsets: Subsets, names: Sequence[str], options: KernelOptions
) -> dict[str, Tensor]:
    """K(train, train) of the kernels ``names`` on ``weights`` (a state dict of ``model``, e.g. the epoch-0 one), in
    float32 on the CPU. The model's own weights are copied aside and loaded back into the same tensors afterwards:
    bit-exact, and an optimiser holding them is unaffected."""
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(weights)
        return {name: compute_kernel(model, name, subsets, options)[0].to("cpu", torch.float32) for name in names}
    finally:
        model.load_state_dict(trained)


def _local_kernels(
    model: nn.Module,
    subsets: Subsets,
    names: Sequence[str],
    options: KernelOptions,
    epoch: int | float,
    shard: tuple[int, int] | None,
    progress: Progress,
) -> Kernels:
    """This rank's part, with no collectives: the logits, its share of the NTK and (rank 0) the CK."""
    try:
        logits = network_logits(model, subsets.x_test, epoch)
    except KernelError as err:
        return Kernels(None, {}, {"network": str(err)})
    local = Kernels(logits, {}, {})
    rank = 0 if shard is None else shard[0]
    for name in names:
        if name == "ck" and rank != 0:
            continue  # cheap: rank 0 computes it alone
        t0 = time.perf_counter()
        try:
            k_train, k_test = compute_kernel(
                model, name, subsets, options, shard=shard if name == "ntk" else None, progress=progress
            )
        except (KernelError, torch.OutOfMemoryError) as err:
            local.failures[name] = f"the {KERNEL_LABELS[name]} computation at epoch {epoch} failed: {err}"
            if "out of memory" in str(err).lower():
                local.out_of_memory.add(name)
            continue
        bad = [what for what, k in (("train", k_train), ("test", k_test)) if not torch.isfinite(k).all()]
        if bad:
            local.failures[name] = (
                f"the {KERNEL_LABELS[name]} at epoch {epoch} has non-finite entries (nan or inf) in its "
                f"{' and '.join(bad)} kernel; check the model's weights and outputs."
            )
            continue
        local.grams[name] = (k_train, k_test, time.perf_counter() - t0)
    return local


def _agree_on_failures(local: Kernels, names: Sequence[str], device: torch.device, epoch: int | float) -> None:
    """Every rank learns which stages failed on any rank, and which of them only ran out of memory (one small
    all-reduce); ``local`` is updated in place to the merged failures."""
    stages = ["network", *names]
    flags = torch.tensor(
        [float(s in local.failures) for s in stages]
        + [float(s in local.failures and s not in local.out_of_memory) for s in stages],
        device=device,
    )
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.SUM)
    failed, other = flags.tolist()[: len(stages)], flags.tolist()[len(stages) :]
    local.out_of_memory = {s for s, f, o in zip(stages, failed, other, strict=True) if f and not o}
    merged = {}
    for stage, flag in zip(stages, failed, strict=True):
        if flag:
            label = "network's outputs" if stage == "network" else KERNEL_LABELS[stage]
            elsewhere = f"the {label} at epoch {epoch} failed on another rank (see its log)"
            merged[stage] = local.failures.get(stage, elsewhere)
    local.failures = merged


def compute_kernels(
    model: nn.Module,
    subsets: Subsets,
    names: Sequence[str],
    options: KernelOptions,
    *,
    epoch: int | float = 0,
    shard: tuple[int, int] | None = None,
    progress: Progress = no_progress,
) -> Kernels:
    """The kernels ``names`` (``"ntk"``, ``"ck"``) of the subsets and the network's logits, for one evaluation.

    With ``shard=(rank, world_size)`` (torch.distributed initialised) every rank must call it: each computes its
    share of the NTK, the ranks agree on the failures (one all-reduce) and sum the NTK shares (one all-reduce per
    matrix), so every rank returns the exact NTK; the CK is computed on rank 0 only. A failed stage is in
    ``failures`` (non-finite outputs fail every kernel) and its kernels are left out, the same on every rank.
    """
    local = _local_kernels(model, subsets, names, options, epoch, shard, progress)
    if shard is None:
        kernels = local
    else:
        if local.failures and shard[0] != 0:  # rank 0 only learns that it failed: say why here
            warnings.warn(f"AfterKernelCallback (rank {shard[0]}): {'; '.join(local.failures.values())}", stacklevel=2)
        _agree_on_failures(local, names, next(model.parameters()).device, epoch)
        kernels = local
    if "network" in kernels.failures:
        kernels.failures = {name: kernels.failures["network"] for name in names}
        kernels.out_of_memory = set()
    kernels.grams = {name: k for name, k in kernels.grams.items() if name not in kernels.failures}
    if shard is not None and "ntk" in kernels.grams:
        for k in kernels.grams["ntk"][:2]:
            torch.distributed.all_reduce(k, op=torch.distributed.ReduceOp.SUM)
    return kernels


# ---------------------------------------------------------------- analyses (rank 0)
def _metric(what: str, epoch: int | float, fn: Callable[..., Any], *args: Any) -> float:
    """``fn(*args)``, or NaN with a warning when the metric is undefined for these kernels."""
    try:
        return float(fn(*args))
    except KernelError as err:
        warnings.warn(f"AfterKernelCallback: {what} at epoch {epoch} is NaN: {err}", stacklevel=3)
        return math.nan


SPECTRUM_TOP = 256
"""Eigenvalues drawn in the spectrum figure of a kernel too large for its whole spectrum."""


def spectrum(k_train: Tensor, figure: bool = True) -> Tensor:
    """The eigenvalues of a train kernel, once per kernel and evaluation, for the effective ranks and the figure:
    all of them up to :data:`~lightning_afterkernel.kernels.metrics.ENTROPY_RANK_MAX_N` examples (``eigvalsh``,
    O(n^3)), else, for the ``figure`` only, the :data:`SPECTRUM_TOP` largest (block Lanczos, O(n^2) per step: at the
    paper's n = 11,982 a full decomposition took ~40 s per kernel on 2 CPU cores, the top 256 tens of seconds), and
    none without it (an empty tensor)."""
    if len(k_train) <= ENTROPY_RANK_MAX_N:
        return eigenspectrum(k_train)
    return eigenspectrum(k_train, top=SPECTRUM_TOP) if figure else k_train.new_empty(0, dtype=torch.float64)


def kernel_metrics(
    name: str,
    epoch: int | float,
    k_train: Tensor,
    y_train: Tensor,
    initial: Tensor | None = None,
    num_classes: int | None = None,
    figure: bool = True,
) -> tuple[dict[str, float], Tensor]:
    """Alignment, CKA and relative distance to the epoch-0 kernel ``initial`` (NaN without it), kernel-target
    alignment (centred one-hot targets of ``num_classes`` classes; None: two classes) and the effective ranks of
    ``k_train``; and its eigenvalues (on the CPU; see :func:`spectrum` for which, and ``figure``)."""
    label = KERNEL_LABELS[name]
    out = dict.fromkeys(("alignment_to_initial", "cka_to_initial", "distance_to_initial"), math.nan)
    if initial is not None:
        k0 = initial.to(k_train.device, torch.float64)
        out["alignment_to_initial"] = _metric(
            f"the {label} alignment to the initial kernel", epoch, kernel_alignment, k_train, k0
        )
        out["cka_to_initial"] = _metric(
            f"the {label} CKA to the initial kernel", epoch, centered_kernel_alignment, k_train, k0
        )
        out["distance_to_initial"] = _metric(
            f"the {label} distance to the initial kernel", epoch, kernel_distance, k_train, k0, "frobenius"
        )
    out["kta"] = _metric(
        f"the {label} kernel-target alignment", epoch, kernel_target_alignment, k_train, y_train, num_classes
    )
    eigenvalues = spectrum(k_train, figure)
    if len(eigenvalues) == len(k_train):  # the whole spectrum: both ranks from it
        out["effective_rank"] = _metric(f"the {label} effective rank", epoch, effective_rank, eigenvalues, "trace")
        out["effective_rank_entropy"] = _metric(
            f"the {label} entropy effective rank", epoch, effective_rank, eigenvalues, "entropy"
        )
    else:  # tr K / lambda_1 needs lambda_1 only; the entropy needs every eigenvalue, which is not affordable here
        out["effective_rank"] = _metric(f"the {label} effective rank", epoch, effective_rank, k_train, "trace")
        out["effective_rank_entropy"] = math.nan
        warnings.warn(
            f"AfterKernelCallback: the entropy effective rank is left out (NaN) above {ENTROPY_RANK_MAX_N} training "
            f"examples ({len(k_train)} here): it needs the whole spectrum, an O(n^3) eigendecomposition per kernel "
            "and evaluation. The paper's effective rank (tr K / lambda_max) is computed as always.",
            stacklevel=2,
        )
    return out, eigenvalues.cpu()


def _soft_margin_accuracy(
    k_train: Tensor, y_train: Tensor, k_test: Tensor, y_test: Tensor, options: AnalysisOptions
) -> float:
    if options.soft_margin_c is None:
        return math.nan
    shared = {k: v for k, v in options.svm.items() if k in ("fit_intercept", "normalize", "tol", "time_limit")}
    try:
        soft = SoftMarginSVM(C=options.soft_margin_c, **shared).fit(k_train, y_train)
    except SolverError as err:
        warnings.warn(f"AfterKernelCallback: the soft-margin fallback failed too: {err}", stacklevel=3)
        return math.nan
    return float(soft.score(k_test, y_test))


def fit_svm(
    name: str,
    epoch: int | float,
    k_train: Tensor,
    y_train: Tensor,
    k_test: Tensor,
    y_test: Tensor,
    options: AnalysisOptions,
    device: str | None = None,
) -> dict[str, Any]:
    """The hard-margin SVM's row fields, or the soft-margin fallback's where no hard margin exists (with a
    warning); ``device`` overrides ``options.svm["device"]``."""
    t0 = time.perf_counter()
    svm_options = dict(options.svm) if device is None else {**options.svm, "device": device}
    try:
        svm = HardMarginSVM(**svm_options).fit(k_train, y_train)
    except SolverError as err:  # NotSeparableError included: recorded, training goes on
        soft = _soft_margin_accuracy(k_train, y_train, k_test, y_test, options)
        fallback = (
            "" if math.isnan(soft) else f" Soft-margin fallback (C={options.soft_margin_c}): test accuracy {soft:.4f}."
        )
        warnings.warn(
            f"AfterKernelCallback: no hard-margin SVM for the {name} kernel at epoch {epoch}: {err}{fallback}",
            stacklevel=2,
        )
        return {
            "svm_test_acc": math.nan,
            "svm_min_margin": math.nan,
            "svm_n_support": -1,
            "svm_separable": 0,
            "svm_soft_test_acc": soft,
            "svm_time_s": time.perf_counter() - t0,
        }
    return {
        "svm_test_acc": float(svm.score(k_test, y_test)),
        "svm_min_margin": float(svm.min_margin_),
        "svm_n_support": int(svm.n_support_),
        "svm_separable": 1,
        "svm_soft_test_acc": math.nan,
        "svm_time_s": time.perf_counter() - t0,
    }


def _svm_and_metrics_on(
    name: str,
    epoch: int | float,
    gram: Tensor,
    k_test: Tensor,
    subsets: Subsets,
    initial: Tensor | None,
    options: AnalysisOptions,
    svm_device: str | None = None,
) -> tuple[dict[str, Any], Tensor, Tensor]:
    fields = fit_svm(name, epoch, gram, subsets.y_train, k_test, subsets.y_test, options, device=svm_device)
    t0 = time.perf_counter()
    metrics, eigenvalues = kernel_metrics(
        name, epoch, gram, subsets.y_train, initial, options.num_classes, options.figures
    )
    return {**fields, **metrics, "analysis_time_s": time.perf_counter() - t0}, gram, eigenvalues


def _svm_and_metrics(
    name: str,
    epoch: int | float,
    k_train: Tensor,
    k_test: Tensor,
    subsets: Subsets,
    initial: Tensor | None,
    options: AnalysisOptions,
) -> tuple[dict[str, Any], Tensor, Tensor]:
    """The SVM and metrics in float64 where the kernel is (the interior-point method's Cholesky and the
    eigen-decompositions are much faster on a GPU); redone on the CPU, with a warning, when the GPU has no room.
    Returns the row fields (``analysis_time_s``: the metrics' time), the float64 train Gram and its eigenvalues."""
    k_test = k_test.to("cpu", torch.float64)
    if k_train.device.type != "cuda":
        return _svm_and_metrics_on(name, epoch, k_train.to("cpu", torch.float64), k_test, subsets, initial, options)
    try:
        return _svm_and_metrics_on(name, epoch, k_train.to(torch.float64), k_test, subsets, initial, options)
    except torch.OutOfMemoryError as err:
        problem = str(err)[:160]
    torch.cuda.empty_cache()  # out of the except block: the failed attempt's tensors are released by now
    warnings.warn(
        f"AfterKernelCallback: the {KERNEL_LABELS[name]} SVM and analyses at epoch {epoch} ran out of GPU memory "
        f"({problem}); doing them on the CPU.",
        stacklevel=3,
    )
    cpu = k_train.to("cpu", torch.float64)  # the SVM on the CPU too, whatever svm={"device": ...} asks for
    return _svm_and_metrics_on(name, epoch, cpu, k_test, subsets, initial, options, svm_device="cpu")


def invariance_families(images: Tensor, n_invariance: int) -> tuple[tuple[str, ...], str | None]:
    """The paper's families that ``images`` allow, and a message saying what is skipped (None when nothing)."""
    if n_invariance == 0:
        return (), None
    if images.ndim != 4 or not images.is_floating_point():
        return (), (
            f"the invariance scores are skipped because the inputs are not floating-point image batches (n, C, H, W) "
            f"(got shape {tuple(images.shape)}, dtype {images.dtype}); set n_invariance=0 to silence this."
        )
    if images.shape[-2] % 2 or images.shape[-1] % 2:
        return tuple(f for f in INVARIANCE_FAMILIES if f != "globalness"), (
            f"the globalness score is skipped: the quadrant swap needs an even height and width, the images are "
            f"{images.shape[-2]} x {images.shape[-1]}."
        )
    return INVARIANCE_FAMILIES, None


def score_invariance(
    model: nn.Module,
    name: str,
    images: Tensor,
    families: Sequence[str],
    options: KernelOptions,
    epoch: int | float = 0,
    progress: Progress = no_progress,
) -> dict[str, float]:
    """The invariance scores of kernel ``name`` on ``images``: family -> score (NaN, with a warning, when
    undefined)."""
    common: dict[str, Any] = dict(
        batch_size=options.batch_size, dtype=options.dtype, device=next(model.parameters()).device
    )
    try:
        if name == "ntk":
            common.update(
                outputs=options.outputs, implementation=options.implementation, memory_budget=options.memory_budget
            )
            with progress("after kernel: NTK invariance") as report:
                scores = invariance_scores(model, images, families, kernel="ntk", progress=report, **common)
        else:
            scores = invariance_scores(model, images, families, kernel="ck", **common)
    except KernelError as err:
        warnings.warn(
            f"AfterKernelCallback: the {KERNEL_LABELS[name]} invariance scores at epoch {epoch} are NaN: {err}",
            stacklevel=2,
        )
        return dict.fromkeys(families, math.nan)
    return {family: scores[family] for family in families}


def network_accuracy(logits: Tensor, y: Tensor) -> float:
    """The network's accuracy from its logits: one logit, (n,), predicts the positive class (label 1) where it is
    positive; k logits, (n, k), predict the label of the largest."""
    if logits.ndim == 2:
        return float((logits.argmax(1) == y).double().mean())
    return float(((logits > 0) == (y > 0)).double().mean())


def _pair_metrics(grams: Mapping[str, Tensor], epoch: int | float) -> tuple[float, float]:
    """Alignment and CKA of the NTK with the CK (NaN unless both were computed)."""
    if not {"ntk", "ck"} <= grams.keys():
        return math.nan, math.nan
    ntk, ck = grams["ntk"], grams["ck"]
    if ntk.device != ck.device:  # one of them fell back to the CPU
        ntk, ck = ntk.cpu(), ck.cpu()
    align = _metric("the NTK-CK alignment", epoch, kernel_alignment, ntk, ck)
    return align, _metric("the NTK-CK CKA", epoch, centered_kernel_alignment, ntk, ck)


def analyse(
    model: nn.Module,
    subsets: Subsets,
    kernels: Kernels,
    names: Sequence[str],
    *,
    epoch: int | float = 0,
    step: int = 0,
    initial: Mapping[str, Tensor] | None = None,
    options: AnalysisOptions | None = None,
    kernel_options: KernelOptions | None = None,
    progress: Progress = no_progress,
) -> Analysis:
    """One row per kernel of ``names``: the SVM (soft-margin fallback), the metrics (against the epoch-0 kernels
    ``initial``), the NTK-CK comparison when both are asked for, and the invariance scores of ``options.families``
    on ``model``. A kernel missing from ``kernels.grams`` gets a failed row (NaN, its ``failures`` message)."""
    options = options or AnalysisOptions()
    kernel_options = kernel_options or KernelOptions()
    initial = initial or {}
    network_acc = math.nan if kernels.logits is None else network_accuracy(kernels.logits, subsets.y_test)
    rows, grams, spectra = [], {}, {}
    for name in names:
        row = ResultRow(epoch=epoch, step=step, kernel=name, network_test_acc=network_acc)
        if name not in kernels.grams:
            row.invariance = dict.fromkeys(options.families, math.nan)
            row.error = kernels.failures.get(name, "not computed")
            rows.append(row)
            continue
        k_train, k_test, row.kernel_time_s = kernels.grams[name]
        fields, grams[name], spectra[name] = _svm_and_metrics(
            name, epoch, k_train, k_test, subsets, initial.get(name), options
        )
        for key, value in fields.items():
            setattr(row, key, value)
        rows.append(row)
    if {"ntk", "ck"} <= set(names):
        align, cka = _pair_metrics(grams, epoch)
        for row in rows:
            row.alignment_ntk_ck, row.cka_ntk_ck = align, cka
    if options.families:
        images = subsets.images(options.invariance_images)[: options.n_invariance]
        for row in rows:
            if row.failed:
                continue
            t0 = time.perf_counter()
            row.invariance = score_invariance(
                model, row.kernel, images, options.families, kernel_options, epoch, progress
            )
            row.analysis_time_s += time.perf_counter() - t0
    return Analysis(rows, grams, spectra)
