"""PNG figures of :class:`~lightning_afterkernel.callbacks.AfterKernelCallback`'s results.

Drawn on :class:`matplotlib.figure.Figure` objects rendered by the Agg canvas, never through ``pyplot``: no
global figure registry, no interactive backend, nothing that needs a display; matplotlib is imported only when a
figure is drawn. Each function writes one PNG atomically (temporary file, then ``os.replace``) and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_afterkernel._io import replacing
from lightning_afterkernel.callbacks.rows import KERNEL_LABELS, ResultRow

DPI = 110
HEATMAP_MAX_EXAMPLES = 400
"""The heatmap shows the first this many examples of the train subset (a random draw), sorted by class."""
SPECTRUM_FLOOR = 1e-7
"""Eigenvalues below this fraction of the largest are left out of the spectrum plot: float32 rounding noise."""

_STYLES = {"ntk": ("tab:blue", "o"), "ck": ("tab:orange", "s"), "network": ("tab:green", "^")}
_FAMILY_COLOURS = {"globalness": "tab:red", "shift": "tab:blue", "rotation": "tab:green", "zoom": "tab:purple"}


def _figure(ncols: int, width: float, height: float, **margins: float) -> tuple[Any, list[Any]]:
    """``ncols`` panels of ``width`` x ``height`` inches side by side, with fixed margins in inches (a layout engine
    would triple the drawing time)."""
    from matplotlib.figure import Figure

    m = {"left": 0.8, "right": 0.2, "bottom": 0.6, "top": 0.45, "gap": 0.8} | margins
    w = width * ncols
    axis_width = (w - m["left"] - m["right"] - (ncols - 1) * m["gap"]) / ncols
    fig = Figure(figsize=(w, height), dpi=DPI)
    fig.subplots_adjust(
        left=m["left"] / w,
        right=1 - m["right"] / w,
        bottom=m["bottom"] / height,
        top=1 - m["top"] / height,
        wspace=m["gap"] / axis_width,
    )
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _save(fig: Any, path: Path) -> Path:
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _epoch_axis(ax: Any, results: Sequence[Mapping[str, Any]]) -> None:
    """x axis in epochs: a tick at every evaluated epoch when there are few, else integer ticks."""
    from matplotlib.ticker import MaxNLocator

    epochs = sorted({r["epoch"] for r in results})
    if len(epochs) <= 12:
        ax.set_xticks(epochs, [f"{e:g}" for e in epochs])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def _epoch_label(epoch: float) -> str:
    return f"epoch {epoch:g}" + (" (initial)" if epoch == 0 else "")


def kernel_heatmaps(
    path: Path,
    grams: Mapping[str, Tensor],
    labels: Tensor,
    epoch: float,
    labels_text: Mapping[str, str],
    class_names: Mapping[int, str],
) -> Path:
    """The train Gram matrices, cosine-normalised (K_ij / sqrt(K_ii K_jj)), rows and columns sorted by class (named
    by ``class_names``, else ``y=<label>``); one panel per kernel, on the first :data:`HEATMAP_MAX_EXAMPLES`
    examples, one colour scale."""
    n = min(len(labels), HEATMAP_MAX_EXAMPLES)
    y = labels[:n].long()
    order = torch.sort(y, stable=True).indices
    classes = sorted(set(y.tolist()))
    counts = [int((y == c).sum()) for c in classes]
    cosines = {}
    for name, gram in grams.items():
        k = gram[:n, :n].detach().to("cpu", torch.float64)[order][:, order]
        d = k.diagonal().clamp(min=torch.finfo(torch.float64).tiny).sqrt()
        cosines[name] = (k / d[:, None] / d[None, :]).clamp(-1, 1).numpy()
    low = min(0.0, *(float(c.min()) for c in cosines.values()))
    names = [class_names.get(c, f"y={c}") for c in classes]
    # Many classes: small names, upright on the y axis (of the first panel only) and turned on the x axis, with room
    # for the longest; two: the names along the axes.
    many = len(classes) > 2
    room = 0.065 * max(map(len, names)) if many else 0.0  # inches
    height = 4.3 + room
    fig, axes = _figure(
        len(grams), 4.0 + room / len(grams), height, left=0.7 + room, right=1.1, gap=0.5, top=0.65, bottom=0.6 + room
    )
    edges = [sum(counts[: i + 1]) - 0.5 for i in range(len(counts) - 1)]
    centres = [sum(counts[:i]) + c / 2 - 0.5 for i, c in enumerate(counts)]
    x_style: dict[str, Any] = {"rotation": 90, "fontsize": "small"} if many else {}
    y_style: dict[str, Any] = {"fontsize": "small"} if many else {"rotation": 90, "va": "center"}
    for i, (ax, (name, cosine)) in enumerate(zip(axes, cosines.items(), strict=True)):
        image = ax.imshow(cosine, cmap="viridis", vmin=low, vmax=1.0, interpolation="nearest")
        for edge in edges:
            ax.axhline(edge, color="white", linewidth=0.6 if many else 1.2)
            ax.axvline(edge, color="white", linewidth=0.6 if many else 1.2)
        ax.set_xticks(centres, names, **x_style)
        ax.set_yticks(centres, names if i == 0 or not many else [], **y_style)
        ax.set_title(labels_text.get(name, name))
        ax.set_xlabel("training examples, by class")
    axes[0].set_ylabel("training examples, by class")
    width = fig.get_figwidth()
    cax = fig.add_axes((1 - 0.95 / width, (0.6 + room) / height, 0.15 / width, 1 - (1.35 + room) / height))
    fig.colorbar(image, cax=cax, label="K(x, x') / sqrt(K(x, x) K(x', x'))")
    fig.suptitle(f"Train kernel (cosine-normalised, {n} examples), {_epoch_label(epoch)}")
    return _save(fig, path)


def eigenspectra(
    path: Path, spectra: Mapping[str, Mapping[float, Tensor]], labels_text: Mapping[str, str], n: int
) -> Path:
    """Eigenvalues of the train kernels divided by the largest, log-log, one line per epoch (e.g. the initial and
    the latest kernel), down to :data:`SPECTRUM_FLOOR`; one panel per kernel."""
    from matplotlib.ticker import NullFormatter

    fig, axes = _figure(len(spectra), 4.4, 3.8, left=0.9, gap=0.9)
    for ax, (name, by_epoch) in zip(axes, spectra.items(), strict=True):
        for i, (epoch, eigenvalues) in enumerate(sorted(by_epoch.items())):
            values = eigenvalues.detach().to("cpu", torch.float64)
            values = values / values.max()
            values = values[values >= SPECTRUM_FLOOR]
            rank = torch.arange(1, len(values) + 1)
            style = "--" if i == 0 and len(by_epoch) > 1 else "-"
            ax.loglog(rank.numpy(), values.numpy(), linestyle=style, label=_epoch_label(epoch))
        for axis in (ax.xaxis, ax.yaxis):  # labels on the decades only: minor labels crowd a narrow range
            axis.set_minor_formatter(NullFormatter())
        shown = max(len(values) for values in by_epoch.values())
        top = "" if shown >= n else f"top {shown}, "  # (above ENTROPY_RANK_MAX_N: the largest eigenvalues only)
        ax.set_title(f"{labels_text.get(name, name)} eigen-spectrum (train, {top}n = {n})")
        ax.set_xlabel("index i (descending)")
        ax.set_ylabel(r"eigenvalue $\lambda_i / \lambda_1$")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
    return _save(fig, path)


def invariance_curves(
    path: Path,
    results: Sequence[Mapping[str, Any]],
    families: Sequence[str],
    kernels: Sequence[str],
    labels_text: Mapping[str, str],
    n: int,
    images: str = "test",
) -> Path:
    """Invariance scores (mean kernel-space cosine between x and T x) on ``n`` ``images`` ("test" or "train")
    images, against epochs; one panel per kernel."""
    fig, axes = _figure(len(kernels), 4.4, 3.8)
    typed = [ResultRow.from_dict(r) for r in results]
    for ax, name in zip(axes, kernels, strict=True):
        rows = sorted((r for r in typed if r.kernel == name), key=lambda r: r.epoch)
        for family in families:
            points = [(r.epoch, r.invariance.get(family, math.nan)) for r in rows]
            points = [(e, v) for e, v in points if math.isfinite(v)]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", color=_FAMILY_COLOURS.get(family), label=family)
        ax.set_title(f"{labels_text.get(name, name)} invariance ({n} {images} images)")
        _epoch_axis(ax, results)
        ax.set_ylabel("mean cosine of x and T(x) in kernel space")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def accuracy_curves(
    path: Path,
    results: Sequence[Mapping[str, Any]],
    kernels: Sequence[str],
    labels_text: Mapping[str, str],
    n_train: int,
    n_test: int,
) -> Path:
    """Test accuracy against epochs: the hard-margin SVM of each kernel (hollow markers: the soft-margin fallback,
    where no hard margin exists) and the network itself, on the same test subset."""
    fig, (ax,) = _figure(1, 6.0, 4.0)
    soft_seen = False
    typed = [ResultRow.from_dict(r) for r in results]
    for name in kernels:
        rows = sorted((r for r in typed if r.kernel == name), key=lambda r: r.epoch)
        colour, marker = _STYLES.get(name, ("tab:gray", "o"))
        points = []
        for r in rows:
            value, hard = r.accuracy
            if math.isfinite(value):
                points.append((r.epoch, 100 * value, hard))
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, color=colour, marker=marker, label=f"{labels_text.get(name, name)} SVM")
        soft = [(e, v) for e, v, hard in points if not hard]
        if soft:
            soft_seen = True
            ax.plot(*zip(*soft, strict=True), linestyle="none", marker=marker, color=colour, markerfacecolor="white")
    network = sorted({r.epoch: r.network_test_acc for r in typed}.items())
    colour, marker = _STYLES["network"]
    ax.plot([e for e, _ in network], [100 * a for _, a in network], color=colour, marker=marker, label="network")
    if soft_seen:
        ax.plot([], [], linestyle="none", marker="o", color="gray", markerfacecolor="white", label="soft-margin SVM")
    ax.set_title(f"Test accuracy on {n_test} test examples (SVMs trained on {n_train})")
    _epoch_axis(ax, results)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def evaluation_figures(
    folder: Path,
    epoch: float,
    grams: Mapping[str, Tensor],
    spectra: Mapping[str, Mapping[float, Tensor]],
    results: Sequence[Mapping[str, Any]],
    kernels: Sequence[str],
    *,
    labels: Tensor,
    class_names: Mapping[int, str],
    n_train: int,
    n_test: int,
    families: Sequence[str],
    n_invariance: int,
    images: str,
) -> dict[str, Path]:
    """The figures after an evaluation at ``epoch``: its kernels' heatmaps and eigen-spectra (``spectra``: kernel ->
    epoch -> eigenvalues, e.g. the initial and this epoch's), the accuracy curves and (with ``families``) the
    invariance curves of every row; name -> path."""
    tag = f"{epoch:g}"
    paths = {
        "kernel_heatmap": kernel_heatmaps(
            folder / f"kernel_heatmap_epoch_{tag}.png", grams, labels, epoch, KERNEL_LABELS, class_names
        ),
        "eigenspectrum": eigenspectra(folder / f"eigenspectrum_epoch_{tag}.png", spectra, KERNEL_LABELS, n_train),
        "accuracy": accuracy_curves(folder / "accuracy.png", results, kernels, KERNEL_LABELS, n_train, n_test),
    }
    if families:
        paths["invariance"] = invariance_curves(
            folder / "invariance.png", results, families, kernels, KERNEL_LABELS, n_invariance, images
        )
    return paths
