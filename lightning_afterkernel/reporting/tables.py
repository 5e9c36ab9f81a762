"""The report's tables of one scale's cell files (markdown lines): SVM errors, invariance scores, kernel structure
and cost, the learning-rate study."""

from __future__ import annotations

from typing import Any

from lightning_afterkernel.callbacks.rows import INVARIANCE_FAMILIES, KERNEL_LABELS, KERNELS
from lightning_afterkernel.reporting.claims import SMALL_TRANSFORMS, STAGES, lr_cells, ordered_cells
from lightning_afterkernel.reporting.stats import get_path, stat, svm_errors


def seeds_text(seeds: list[dict[str, Any]], expected: int | None = None) -> str:
    """How many seeds a cell has: ``3``, or ``2 of 3`` while some of the ``expected`` seeds are missing."""
    return f"{len(seeds)} of {expected}" if expected is not None and len(seeds) < expected else str(len(seeds))


def _svm_cell(seeds: list[dict[str, Any]], kernel: str, stage: str) -> str:
    return svm_errors(seeds, kernel, stage).fmt()


def error_table(runs: dict[str, list[dict[str, Any]]], expected_seeds: int | None = None) -> list[str]:
    """One row per cell: the network's test error and the SVM test errors (%) of each kernel and stage."""
    lines = [
        "| cell | seeds | network itself | NTK initial | NTK after few epochs | NTK end (after kernel) | CK initial "
        "| CK end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ordered_cells(runs):
        s = runs[name]
        lines.append(
            f"| {name} | {seeds_text(s, expected_seeds)} | {stat(s, 'network_test_error').fmt(100, 1)} | "
            f"{_svm_cell(s, 'ntk', 'initial')} | "
            f"{_svm_cell(s, 'ntk', 'few')} | {_svm_cell(s, 'ntk', 'end')} | {_svm_cell(s, 'ck', 'initial')} | "
            f"{_svm_cell(s, 'ck', 'end')} |"
        )
    return lines


def failures(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per failed SVM evaluation (cell, seed, kernel, stage and the error)."""
    lines = []
    for name in ordered_cells(runs):
        for kernel in KERNELS:
            for stage in STAGES:
                for seed, message in svm_errors(runs[name], kernel, stage).failed.items():
                    lines.append(f"- {name} seed {seed}, {KERNEL_LABELS[kernel]} {stage}: {message}")
    return lines


def invariance_table(runs: dict[str, list[dict[str, Any]]], kernel: str) -> list[str]:
    """One row per cell: ``kernel``'s invariance scores, initial and at the end."""
    head = " | ".join(f"{f} initial | {f} end" for f in INVARIANCE_FAMILIES)
    lines = [f"| cell | {head} |", "|---|" + "---|" * (2 * len(INVARIANCE_FAMILIES))]
    for name in ordered_cells(runs):
        s = runs[name]
        vals = []
        for fam in INVARIANCE_FAMILIES:
            for stage in ("initial", "end"):
                vals.append(stat(s, "kernels", kernel, stage, "invariance", fam).fmt())
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return lines


def _run_time(seeds: list[dict[str, Any]]) -> str:
    """Mean wall time of the runs; a lower bound ("≥") where an older cell file counted only its last attempt."""
    partial = any(get_path(d, ("timings", "resumed")) and "attempts" not in d["timings"] for d in seeds)
    return ("≥ " if partial else "") + stat(seeds, "timings", "total_s").fmt(1, 0)


def kernel_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One row per cell: NTK-CK alignment, NTK effective rank and drift, epochs and run time."""
    lines = [
        "| cell | NTK-CK alignment initial | NTK-CK alignment end | NTK eff. rank initial | NTK eff. rank end | "
        "NTK alignment end-to-initial | epochs | run time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ordered_cells(runs):
        s = runs[name]
        lines.append(
            f"| {name} | {stat(s, 'alignment_ntk_ck', 'initial').fmt()} | {stat(s, 'alignment_ntk_ck', 'end').fmt()} | "
            f"{stat(s, 'kernels', 'ntk', 'initial', 'effective_rank').fmt(1, 2)} | "
            f"{stat(s, 'kernels', 'ntk', 'end', 'effective_rank').fmt(1, 2)} | "
            f"{stat(s, 'kernels', 'ntk', 'end', 'alignment_to_initial').fmt()} | "
            f"{stat(s, 'epochs_trained').fmt(1, 1)} | {_run_time(s)} |"
        )
    return lines


def lr_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each learning-rate cell beside its lr 0.01 reference: epochs, losses, errors and small invariances."""
    lines = [
        "| cell | lr | epochs | final train loss | target loss | network | NTK SVM end | shift end | rotation end | "
        "zoom end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ref in lr_cells(runs):
        for cell in (ref, name):
            s = runs[cell]
            inv = [stat(s, "kernels", "ntk", "end", "invariance", f).fmt() for f in SMALL_TRANSFORMS]
            lines.append(
                f"| {cell} | {s[0]['config']['lr']:g} | {stat(s, 'epochs_trained').fmt(1, 1)} | "
                f"{stat(s, 'final_train_loss').fmt(1, 4)} | {stat(s, 'config', 'target_train_loss').fmt(1, 4)} | "
                f"{stat(s, 'network_test_error').fmt(100, 1)} | {_svm_cell(s, 'ntk', 'end')} | "
                + " | ".join(inv)
                + " |"
            )
    return lines
