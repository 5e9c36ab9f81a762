"""The summary table printed at the end of fit: kernel x epoch, as text."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_afterkernel.callbacks.rows import INVARIANCE_FAMILIES, KERNEL_LABELS, ResultRow

ANALYSES = (
    ("kernel-target alignment", "kta", 3),
    ("effective rank", "effective_rank", 1),
    ("alignment to epoch 0", "alignment_to_initial", 3),
    ("change from epoch 0", "distance_to_initial", 3),
)
"""The analysis lines of the table: label, row field, decimals."""


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _svm_cell(row: ResultRow | None) -> str:
    if row is None:
        return "-"
    if row.failed:
        return "failed"
    accuracy, hard = row.accuracy
    if hard:
        return _pct(accuracy)
    return "not separable" if math.isnan(accuracy) else f"{_pct(accuracy)} (soft)"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def summary_table(
    results: Sequence[Mapping[str, Any]],
    kernels: Sequence[str],
    *,
    n_train: int,
    n_test: int,
    soft_margin_c: float | None,
    n_invariance: int,
    invariance_images: str,
    num_classes: int | None = None,
) -> str:
    """Kernel x epoch -> SVM test accuracy, beside the network's own test accuracy, then the kernel analyses
    (kernel-target alignment, effective rank, change from the initial kernel, invariance scores) of the rows
    ``results`` of ``kernels``; the invariance scores on ``n_invariance`` ``invariance_images`` images.
    ``num_classes``: k for a model with k logits (one-vs-rest SVMs above two classes, centred one-hot targets in the
    kernel-target alignment); None for one logit."""
    rows = [ResultRow.from_dict(r) for r in results]
    epochs = sorted({r.epoch for r in rows})
    by_key = {(r.epoch, r.kernel): r for r in rows}
    kernels = [k for k in kernels if any(r.kernel == k for r in rows)]
    header = ["kernel"] + [f"epoch {e}" + (" (initial)" if e == 0 else "") for e in epochs]
    lines = [[f"{KERNEL_LABELS[k]} SVM"] + [_svm_cell(by_key.get((e, k))) for e in epochs] for k in kernels]
    net = {r.epoch: r.network_test_acc for r in rows}
    lines.append(["network itself"] + [_pct(net[e]) for e in epochs])
    families = [f for f in INVARIANCE_FAMILIES if any(f in r.invariance for r in rows)]
    extra = []
    for k in kernels:
        cells = [by_key.get((e, k)) for e in epochs]
        for label, key, digits in ANALYSES:
            extra.append(
                [f"{KERNEL_LABELS[k]} {label}"] + [_number(row and getattr(row, key), digits) for row in cells]
            )
        for family in families:
            extra.append(
                [f"{KERNEL_LABELS[k]} {family}"] + [_number(row and row.invariance.get(family), 3) for row in cells]
            )
    widths = [max(len(row[i]) for row in [header] + lines + extra) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    title = f"After-kernel summary: test accuracy on {n_test} test examples (SVM trained on {n_train})"
    if num_classes is not None and num_classes > 2:
        title = title[:-1] + f"; {num_classes} classes, one-vs-rest)"
    table = [title, rule, fmt.format(*header), rule] + [fmt.format(*r) for r in lines] + [rule]
    table += [fmt.format(*r) for r in extra] + [rule]
    if any(r.separable is False for r in rows):
        table.append(
            "(soft): no hard-margin SVM exists for that kernel; soft-margin SVM "
            f"(C={soft_margin_c}, normalised kernel) accuracy instead."
        )
    targets = "y'Ky / (n ||K||)" if num_classes is None else "<K, YY'> / (||K|| ||YY'||), Y the centred one-hot labels"
    note = (
        f"Kernel analyses on the {n_train} training examples: kernel-target alignment {targets}, "
        "effective rank tr K / max eigenvalue, alignment <K, K0> / (||K|| ||K0||) and relative change "
        "||K - K0|| / ||K0|| from the epoch-0 kernel K0"
    )
    if families:
        images = f"{n_invariance} {'test' if invariance_images == 'test' else 'training'} images"
        note += f"; invariance: mean kernel-space cosine between x and T(x) over {images}"
    table.append(note + ".")
    return "\n".join(table)
