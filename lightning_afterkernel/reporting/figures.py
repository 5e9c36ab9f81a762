"""The report's figures, one panel (or row of panels) per scale, from the cell files only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lightning_afterkernel.callbacks.rows import INVARIANCE_FAMILIES, KERNEL_LABELS
from lightning_afterkernel.reporting.claims import STAGES, ordered_cells
from lightning_afterkernel.reporting.evidence import (
    evaluated_epochs,
    evidence_cells,
    network_error_of,
    rows_by_epoch,
    svm_errors_of,
)
from lightning_afterkernel.reporting.grid import ARCHITECTURES, DATASETS
from lightning_afterkernel.reporting.stats import Stat, stat, svm_errors

Runs = dict[str, list[dict[str, Any]]]
SVM_ERROR_PNG = "reproduction_svm_error.png"
INVARIANCE_PNG = "reproduction_invariance.png"
EPOCHS_PNG = "reproduction_epochs.png"
STAGE_LABELS = {"initial": "initial kernel", "few": "after a few epochs", "end": "after kernel (end)"}


class _Figures:
    """The two pyplot calls the figures make, on plain :class:`~matplotlib.figure.Figure` objects, so that writing
    the report never switches the process's matplotlib backend (e.g. a notebook's)."""

    @staticmethod
    def subplots(*args: Any, figsize: tuple[float, float] | None = None, **kwargs: Any) -> tuple[Any, Any]:
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(*args, **kwargs)

    @staticmethod
    def get_cmap(name: str) -> Any:
        import matplotlib

        return matplotlib.colormaps[name]


def _layout(fig: Any, bottom: float, top: float = 0.35) -> None:
    """Tight panels between ``bottom`` inches kept for the figure legend and ``top`` inches for the title."""
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, bottom / height, 1, 1 - top / height))


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110, metadata={"Software": None})
    fig.clf()
    return path


def draw_figures(scales: list[tuple[str, Runs]], figures_dir: Path) -> list[Path]:
    """The figures of the scales that have cell files, (label, runs) each: :data:`SVM_ERROR_PNG` (NTK SVM error,
    initial vs after), :data:`INVARIANCE_PNG` (NTK invariance, initial vs after) and, where some scale has a
    no-augmentation cell, :data:`EPOCHS_PNG` (kernel SVM and network test errors against epochs)."""
    plt = _Figures()
    figures_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        _save(_svm_error_figure(plt, scales), figures_dir / SVM_ERROR_PNG),
        _save(_invariance_figure(plt, scales), figures_dir / INVARIANCE_PNG),
    ]
    if any(evaluated_epochs(runs) for _, runs in scales):
        paths.append(_save(_epochs_figure(plt, scales), figures_dir / EPOCHS_PNG))
    return paths


def _svm_error_figure(plt: Any, scales: list[tuple[str, Runs]]) -> Any:
    widest = max(len(runs) for _, runs in scales)
    fig, axes = plt.subplots(len(scales), 1, figsize=(max(6.0, 0.9 * widest + 2), 3.6 * len(scales) + 0.4))
    width = 0.27
    for ax, (label, runs) in zip(axes if len(scales) > 1 else [axes], scales, strict=True):
        names = ordered_cells(runs)
        for i, stage in enumerate(STAGES):
            stats = [Stat(list(svm_errors(runs[n], "ntk", stage).hard.values())) for n in names]
            ax.bar(
                [j + (i - 1) * width for j in range(len(names))],
                [100 * (s.mean if s.mean is not None else math.nan) for s in stats],
                width,
                yerr=[100 * (s.se or 0.0) for s in stats],
                label=STAGE_LABELS[stage],
            )
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{label} scale")
        ax.set_ylabel("hard-margin SVM test error (%)")
        ax.legend(fontsize=8)
    fig.suptitle("NTK SVM test error: initial vs after kernel")
    _layout(fig, bottom=0.0)
    return fig


def _invariance_figure(plt: Any, scales: list[tuple[str, Runs]]) -> Any:
    n_fam = len(INVARIANCE_FAMILIES)
    fig, axes = plt.subplots(
        len(scales), n_fam, figsize=(4 * n_fam, 4 * len(scales) + 0.8), sharex=True, sharey=True, squeeze=False
    )
    palette = plt.get_cmap("tab20").colors
    every = ordered_cells({name: seeds for _, runs in scales for name, seeds in runs.items()})
    colours = {name: palette[i % len(palette)] for i, name in enumerate(every)}  # one colour per cell at every scale
    for row, (label, runs) in zip(axes, scales, strict=True):
        for ax, fam in zip(row, INVARIANCE_FAMILIES, strict=True):
            for name in ordered_cells(runs):
                init = stat(runs[name], "kernels", "ntk", "initial", "invariance", fam)
                end = stat(runs[name], "kernels", "ntk", "end", "invariance", fam)
                if init.mean is None or end.mean is None:
                    continue
                ax.errorbar(
                    init.mean,
                    end.mean,
                    xerr=init.se or 0.0,
                    yerr=end.se or 0.0,
                    fmt="s" if "-vgg-" in name else "o",
                    color=colours[name],
                    label=name,
                )
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
            ax.set_title(f"{fam} ({label} scale)")
        row[0].set_ylabel("after kernel (end)")
    for ax in axes[-1]:
        ax.set_xlabel("initial kernel")
    axes[0][0].set_xlim(0, 1)
    axes[0][0].set_ylim(0, 1)
    handles = {}
    for ax in axes[:, 0]:
        handles |= dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    labels = [name for name in every if name in handles]
    fig.legend([handles[n] for n in labels], labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=7)
    fig.suptitle("NTK invariance scores (cosine of x and T x): above the diagonal = more invariant after training")
    _layout(fig, bottom=0.7)
    return fig


def _epoch_series(seeds: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Per curve (kernel and margin kind, or the network), the epochs and mean test errors (%) that have a value."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    n = len(seeds)
    for epoch, rows in rows_by_epoch(seeds).items():
        points = {"network itself": network_error_of(rows, n).mean}
        for kernel, by_seed in rows.items():
            errors = svm_errors_of(by_seed, n)
            points[f"{KERNEL_LABELS[kernel]} SVM"] = Stat(list(errors.hard.values())).mean
            points[f"{KERNEL_LABELS[kernel]} SVM (soft margin)"] = Stat(list(errors.soft.values())).mean
        for name, value in points.items():
            if value is not None:
                xs, ys = series.setdefault(name, ([], []))
                xs.append(epoch)
                ys.append(100 * value)
    return series


def _error_axis(ax: Any) -> None:
    """0-100% on a scale that is linear below 0.1% and logarithmic above: 0.2% and 50% errors both read."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(0, 100)
    ax.yaxis.set_major_locator(FixedLocator([0, 0.1, 0.3, 1, 3, 10, 30, 100]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(FixedLocator([]))
    ax.grid(axis="y", lw=0.3)
    ax.set_xlabel("epoch", fontsize=8)


def _epochs_figure(plt: Any, scales: list[tuple[str, Runs]]) -> Any:
    pairs = [f"{d}-{a}" for d in DATASETS for a in ARCHITECTURES]
    fig, axes = plt.subplots(
        len(scales), len(pairs), figsize=(3.6 * len(pairs), 3.4 * len(scales) + 0.6), squeeze=False
    )
    styles = {"NTK": "C0", "CK": "C1", "network": "C2"}
    for row, (label, runs) in zip(axes, scales, strict=True):
        cells = dict(evidence_cells(runs))
        for ax, pair in zip(row, pairs, strict=True):
            ax.set_title(f"{pair} ({label} scale)", fontsize=9)
            series = _epoch_series(runs[cells[pair]]) if pair in cells else {}
            if not series:
                ax.text(0.5, 0.5, "no rows yet", ha="center", va="center", transform=ax.transAxes)
                continue
            for name, (xs, ys) in series.items():
                soft = "soft" in name
                ax.plot(
                    xs,
                    ys,
                    ls=":" if soft else "-",
                    marker="o",
                    mfc="none" if soft else None,
                    color=styles[name.split()[0]],
                    label=name,
                )
            _error_axis(ax)
        row[0].set_ylabel("test error (%)")
    handles = {}
    for ax in axes.flat:
        handles |= dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle("Kernel SVM and network test error against epochs (lr 0.01, no augmentation)")
    _layout(fig, bottom=0.45)
    return fig
