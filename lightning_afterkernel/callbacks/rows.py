"""The result row: one kernel at one evaluation, and the names every reader of rows shares.

A row is what :attr:`AfterKernelCallback.results <lightning_afterkernel.callbacks.AfterKernelCallback.results>`
holds (a plain dict, NaN for an undefined metric), what checkpoints keep and what ``afterkernel_results.json``
lists (NaN written as null). :class:`ResultRow` is its one typed definition: the callback builds rows through it,
and the logging, the summary table, the figures and the reproduction grid read rows through it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from lightning_afterkernel._io import finite_or_none
from lightning_afterkernel.invariance import PAPER_FAMILIES

KernelName = Literal["ntk", "ck"]
KERNELS: tuple[KernelName, ...] = ("ntk", "ck")
"""The kernels the callback computes: the empirical NTK and the conjugate kernel of the penultimate features."""
KERNEL_LABELS: Mapping[str, str] = MappingProxyType({"ntk": "NTK", "ck": "CK"})
"""How tables and figures name each kernel."""
INVARIANCE_FAMILIES: tuple[str, ...] = tuple(PAPER_FAMILIES)
"""The paper's four invariance scores: globalness, shift, rotation, zoom."""
INVARIANCE_IMAGES = ("test", "train")
"""Whose images the invariance scores are on: the kernel test subset's (the default, as the author's code) or the
train subset's."""
INVARIANCE_PREFIX = "invariance_"

SVM_METRICS = ("svm_test_acc", "svm_min_margin", "svm_n_support", "svm_separable")
"""The hard-margin SVM's test accuracy, smallest training margin, support-vector count (-1 when no hard margin
exists) and whether a hard margin exists (1/0)."""
INITIAL_METRICS = ("alignment_to_initial", "cka_to_initial", "distance_to_initial")
"""Uncentred and centred alignment with the epoch-0 kernel, and the relative change from it."""
SPECTRAL_METRICS = ("kta", "effective_rank", "effective_rank_entropy")
"""Kernel-target alignment and the two effective ranks."""
KERNEL_METRICS = SVM_METRICS + INITIAL_METRICS + SPECTRAL_METRICS
"""Per-kernel fields of a result row logged as ``afterkernel/<kernel>/<field>``."""
PAIR_METRICS = ("alignment_ntk_ck", "cka_ntk_ck")
"""NTK against CK on the train subset: in every row of an evaluation that asked for both, logged once."""
TIME_FIELDS = ("kernel_time_s", "svm_time_s", "analysis_time_s")


def invariance_key(family: str) -> str:
    """The row field of an invariance family's score (``invariance_<family>``)."""
    return f"{INVARIANCE_PREFIX}{family}"


def _number(value: Any) -> Any:
    """A field read back from a results file: null is the NaN that :func:`finite_or_none` wrote."""
    return math.nan if value is None else value


@dataclass
class ResultRow:
    """One kernel at one evaluation. NaN marks a metric that is undefined or was not computed (a failed
    evaluation has NaN everywhere and an ``error`` message).

    - ``svm_test_acc``: the hard-margin SVM's accuracy on the kernel test subset; ``svm_min_margin`` its smallest
      functional margin on the train subset (1 at the optimum), ``svm_n_support`` its support vectors (-1 when no
      hard margin exists), ``svm_separable`` 1/0; ``svm_soft_test_acc`` the soft-margin fallback's accuracy where
      no hard margin exists;
    - ``alignment_to_initial``, ``cka_to_initial``: uncentred and centred alignment <K, K_0> / (||K|| ||K_0||) with
      the epoch-0 kernel K_0; ``distance_to_initial``: ||K - K_0||_F / ||K_0||_F (the change *with* scale);
    - ``kta``: kernel-target alignment y^T K y / (n ||K||_F), y in {-1, 1}, on the train subset;
    - ``effective_rank``: tr K / lambda_max (the paper's); ``effective_rank_entropy``: exp of the entropy of the
      normalised eigenvalues;
    - ``invariance``: per family (``globalness``, ``shift``, ``rotation``, ``zoom``), the mean kernel-space cosine
      K(x, Tx) / sqrt(K(x, x) K(Tx, Tx)) over the invariance images, averaged over the family's transforms;
    - ``alignment_ntk_ck``, ``cka_ntk_ck``: NTK against CK on the train subset (the same in both rows);
    - ``network_test_acc``: the network's own accuracy on the kernel test subset (the same in every row);
    - ``kernel_time_s``, ``svm_time_s``, ``analysis_time_s``: seconds spent on each part.
    """

    epoch: int | float  # epochs of training behind the weights (fractional when max_steps cut an epoch)
    step: int | None  # global step (None where a row read back lacks it)
    kernel: str  # "ntk" or "ck"
    network_test_acc: float = math.nan  # the network itself on the kernel test subset
    kernel_time_s: float = math.nan
    svm_test_acc: float = math.nan
    svm_min_margin: float = math.nan
    svm_n_support: int | float = math.nan
    svm_separable: int | float = math.nan
    svm_soft_test_acc: float = math.nan  # the soft-margin fallback's, where no hard margin exists
    svm_time_s: float = math.nan
    alignment_to_initial: float = math.nan
    cka_to_initial: float = math.nan
    distance_to_initial: float = math.nan
    kta: float = math.nan
    effective_rank: float = math.nan
    effective_rank_entropy: float = math.nan
    analysis_time_s: float = math.nan
    alignment_ntk_ck: float | None = None  # None: the evaluation did not ask for both kernels
    cka_ntk_ck: float | None = None
    invariance: dict[str, float] = field(default_factory=dict)  # family -> score, for the families scored
    error: str | None = None  # why the evaluation of this kernel failed

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def separable(self) -> bool | None:
        """Whether a hard-margin SVM exists; None where the evaluation failed."""
        return None if math.isnan(self.svm_separable) else bool(self.svm_separable)

    @property
    def accuracy(self) -> tuple[float, bool]:
        """The SVM's test accuracy and whether it is the hard margin's (else the soft-margin fallback's)."""
        if self.separable is False:
            return self.svm_soft_test_acc, False
        return self.svm_test_acc, True

    def to_dict(self) -> dict[str, Any]:
        """The row as :attr:`AfterKernelCallback.results` holds it: invariance scores as ``invariance_<family>``,
        the NTK-CK fields only when computed, ``error`` only for a failed evaluation."""
        out: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "kernel": self.kernel}
        out["network_test_acc"] = self.network_test_acc
        out["kernel_time_s"] = self.kernel_time_s
        for key in (*SVM_METRICS, "svm_soft_test_acc", "svm_time_s", *INITIAL_METRICS, *SPECTRAL_METRICS):
            out[key] = getattr(self, key)
        out["analysis_time_s"] = self.analysis_time_s
        for key in PAIR_METRICS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update({invariance_key(family): score for family, score in self.invariance.items()})
        if self.error is not None:
            out["error"] = self.error
        return out

    def to_json(self) -> dict[str, Any]:
        """:meth:`to_dict` as strict JSON values (NaN as null), as the results file holds it."""
        return finite_or_none(self.to_dict())

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> ResultRow:
        """A row from :attr:`AfterKernelCallback.results`, a checkpoint or a results file (nulls read as NaN;
        fields that older files lack are NaN). Only ``epoch`` and ``kernel`` are required."""
        numbers = {
            key: _number(row.get(key))
            for key in ("network_test_acc", *TIME_FIELDS, *KERNEL_METRICS, "svm_soft_test_acc")
        }
        pairs = {key: _number(row[key]) for key in PAIR_METRICS if key in row}
        invariance = {
            key[len(INVARIANCE_PREFIX) :]: _number(value)
            for key, value in row.items()
            if key.startswith(INVARIANCE_PREFIX)
        }
        error = row.get("error")
        return cls(
            epoch=row["epoch"],
            step=row.get("step"),
            kernel=row["kernel"],
            invariance=invariance,
            error=None if error is None else str(error),
            **numbers,
            **pairs,
        )

    def logged(self, prefix: str = "afterkernel") -> dict[str, float]:
        """This kernel's logged metrics: ``<prefix>/<kernel>/<field>`` for :data:`KERNEL_METRICS`, the
        soft-margin accuracy when there is one, ``<prefix>/<kernel>/invariance/<family>``, and the NTK-CK fields
        as ``<prefix>/<field>``."""
        own = f"{prefix}/{self.kernel}"
        metrics = {f"{own}/{key}": float(getattr(self, key)) for key in KERNEL_METRICS}
        if not math.isnan(self.svm_soft_test_acc):
            metrics[f"{own}/svm_soft_test_acc"] = self.svm_soft_test_acc
        metrics.update({f"{own}/invariance/{family}": score for family, score in self.invariance.items()})
        for key in PAIR_METRICS:
            if getattr(self, key) is not None:
                metrics[f"{prefix}/{key}"] = getattr(self, key)
        return metrics


def logged_metrics(rows: Sequence[ResultRow], prefix: str = "afterkernel") -> dict[str, float]:
    """The metrics of one evaluation (its rows, one per kernel) as the callback logs them: ``<prefix>/epoch``,
    ``<prefix>/network_test_acc`` and each row's :meth:`ResultRow.logged`."""
    metrics = {f"{prefix}/epoch": float(rows[0].epoch), f"{prefix}/network_test_acc": rows[0].network_test_acc}
    for row in rows:
        metrics.update(row.logged(prefix))
    return metrics
