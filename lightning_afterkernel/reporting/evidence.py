"""Evidence against epochs, from the rows of the lr 0.01 no-augmentation cells (one row per evaluated epoch and
kernel; the ``full`` scale evaluates epochs 0, 1, 2, 5 and 10 there): per dataset-architecture pair, the kernel SVM
test errors (NTK and CK, the initial kernel at epoch 0), the network's own test error and the invariance scores."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_afterkernel.callbacks.rows import KERNEL_LABELS, ResultRow
from lightning_afterkernel.reporting.claims import SMALL_TRANSFORMS
from lightning_afterkernel.reporting.grid import ARCHITECTURES, DATASETS
from lightning_afterkernel.reporting.stats import Stat, SvmErrors

EpochRows = dict[str, dict[int, ResultRow]]
"""The rows of one epoch: kernel -> seed -> row."""


def evidence_cells(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """(pair, cell) for each lr 0.01 no-augmentation cell in ``runs``, in report order."""
    pairs = [f"{d}-{a}" for d in DATASETS for a in ARCHITECTURES]
    return [(p, f"{p}-noaug") for p in pairs if f"{p}-noaug" in runs]


def rows_by_epoch(seeds: list[dict[str, Any]]) -> dict[float, EpochRows]:
    """The cell's rows by epoch, kernel and seed (a later row of the same epoch and kernel replaces an earlier)."""
    out: dict[float, EpochRows] = {}
    for d in seeds:
        for row in map(ResultRow.from_dict, d.get("rows") or []):
            out.setdefault(row.epoch, {}).setdefault(row.kernel, {})[d["seed"]] = row
    return dict(sorted(out.items()))


def evaluated_epochs(runs: dict[str, list[dict[str, Any]]]) -> list[float]:
    """Every epoch evaluated in some seed of some evidence cell, in order."""
    return sorted({e for _, cell in evidence_cells(runs) for e in rows_by_epoch(runs[cell])})


def svm_errors_of(rows: dict[int, ResultRow], total: int) -> SvmErrors:
    """The SVM test errors of one kernel at one epoch from its rows by seed (hard, soft-margin or failed)."""
    out = SvmErrors({}, {}, {}, total)
    for seed, row in rows.items():
        acc, hard = row.accuracy
        if row.failed or math.isnan(acc):
            out.failed[seed] = row.error or "no SVM result"
        else:
            (out.hard if hard else out.soft)[seed] = 1.0 - acc
    return out


def network_error_of(epoch_rows: EpochRows, total: int) -> Stat:
    """The network's own test error (on the kernel test images) at one epoch, by seed."""
    by_seed: dict[int, float] = {}
    for rows in epoch_rows.values():
        for seed, row in rows.items():
            if math.isfinite(row.network_test_acc):
                by_seed[seed] = 1.0 - row.network_test_acc
    return Stat([by_seed[s] for s in sorted(by_seed)], total)


def invariance_of(rows: dict[int, ResultRow], family: str, total: int) -> Stat:
    """One kernel's invariance score of ``family`` at one epoch, by seed."""
    values = [rows[s].invariance.get(family, math.nan) for s in sorted(rows)]
    return Stat([v for v in values if math.isfinite(v)], total)


@dataclass(frozen=True)
class Measure:
    """A row of an epoch table: its label and its text at one epoch (from that epoch's rows and the seed count)."""

    label: str
    text: Callable[[EpochRows, int], str]


def svm_measure(kernel: str) -> Measure:
    return Measure(f"{KERNEL_LABELS[kernel]} SVM", lambda rows, n: svm_errors_of(rows.get(kernel, {}), n).fmt())


NETWORK = Measure("network itself (SVM test images)", lambda rows, n: network_error_of(rows, n).fmt(100, 1))


def invariance_measure(family: str, kernel: str = "ntk") -> Measure:
    return Measure(
        f"{KERNEL_LABELS[kernel]} {family}", lambda rows, n: invariance_of(rows.get(kernel, {}), family, n).fmt()
    )


ERRORS = (svm_measure("ntk"), svm_measure("ck"), NETWORK)
"""The appendix table: both kernels' SVM test errors and the network's own, in %."""


def epoch_table(runs: dict[str, list[dict[str, Any]]], measures: tuple[Measure, ...]) -> list[str]:
    """Markdown rows: for each pair, one row per measure, one column per evaluated epoch ("n/a" where that pair's
    cell did not evaluate the epoch); [n/N] marks values only n of the cell's N seeds have."""
    epochs = evaluated_epochs(runs)
    lines = [
        "| pair | measure | " + " | ".join(f"epoch {e:g}" for e in epochs) + " |",
        "|---|---|" + "---|" * len(epochs),
    ]
    for pair, cell in evidence_cells(runs):
        by_epoch, n = rows_by_epoch(runs[cell]), len(runs[cell])
        for i, m in enumerate(measures):
            values = [m.text(by_epoch[e], n) if e in by_epoch else "n/a" for e in epochs]
            lines.append(f"| {pair if i == 0 else ''} | {m.label} | " + " | ".join(values) + " |")
    return lines


CLAIM_EVIDENCE: dict[str, tuple[str, tuple[Measure, ...]]] = {
    "1": ("NTK SVM test error and the network's own test error (%)", (svm_measure("ntk"), NETWORK)),
    "2": ("NTK globalness score (quadrant-swap similarity)", (invariance_measure("globalness"),)),
    "3": ("NTK shift, rotation and zoom scores", tuple(invariance_measure(f) for f in SMALL_TRANSFORMS)),
    "5": ("NTK and CK SVM test errors (%)", (svm_measure("ntk"), svm_measure("ck"))),
}
"""What each claim's verdict is shown beside, against epochs, where it does not agree."""
