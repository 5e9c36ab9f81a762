"""``python -m lightning_afterkernel reproduce ...`` and ``python -m lightning_afterkernel report ...``."""

from __future__ import annotations

import argparse
import logging
import os

from lightning_afterkernel.data.sources import default_cache_dir, locate_split
from lightning_afterkernel.reporting.grid import SCALES, grid_cells, run_grid, select_cells
from lightning_afterkernel.reporting.report import DEFAULT_OUT, write_report

COMMANDS = ("reproduce", "report")


def _scales_help() -> str:
    rows = []
    for s in SCALES.values():
        rows.append(
            f"  {s.name}: train {s.train_subset or 'all'} / test {s.test_subset or 'all'} images, kernels on "
            f"{s.n_train or 'all'}/{s.n_test or 'all'}, {s.max_epochs} epochs (few = {s.few_epochs}), lr study "
            f"{s.large_lr:g} (cap {s.lr_max_epochs} epochs), {s.seeds} seed(s)"
        )
    return "\n".join(rows)


def reproduce_parser() -> argparse.ArgumentParser:
    cells = ", ".join(c.name for c in grid_cells(SCALES["cpu"]))
    p = argparse.ArgumentParser(
        prog="python -m lightning_afterkernel reproduce",
        description=(
            "Run (or resume) the paper grid {mnist, cifar10} x {vgg, mlp} x {noaug, aug} plus the learning-rate "
            "study; each cell and seed is one fit with AfterKernelCallback, summarised in <out>/<cell>/seed<k>/"
            "cell.json. Complete cells are skipped; unfinished ones resume from their last epoch checkpoint. One "
            "--out folder holds one scale: a folder with runs of another scale is refused."
        ),
        epilog=f"scales:\n{_scales_help()}\ncells: {cells}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/paper", help="output folder (default: runs/paper)")
    p.add_argument("--scale", choices=list(SCALES), default="cpu", help="run size (default: cpu)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the scale's)")
    p.add_argument(
        "--data-root",
        default=os.environ.get("AFTERKERNEL_DATA"),
        help="folder with the MNIST/CIFAR-10 files, read without download (default: $AFTERKERNEL_DATA, else the "
        f"data modules' cache {default_cache_dir()}, into which torchvision first downloads the missing files)",
    )
    p.add_argument("--cells", nargs="+", default=None, metavar="CELL", help="run only these cells (default: all)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (default: auto)")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightning_afterkernel report",
        description=(
            "Write the reproduction report (markdown tables, PNG figures, claim-by-claim verdicts) from the cell "
            "files of `reproduce` runs: one folder per scale, reported side by side in the order given, each claim "
            "judged at each scale. A folder still running is reported with what it holds (verdicts pending until "
            "their cells are complete); an absent or empty one says so."
        ),
        epilog="example: python -m lightning_afterkernel report results/full results/cpu",
    )
    p.add_argument(
        "runs", nargs="*", default=["runs/paper"], help="reproduce output folders, one scale each (default: runs/paper)"
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"markdown file (default: {DEFAULT_OUT})")
    p.add_argument("--figures-dir", default=None, help="where the PNGs go (default: <out dir>/figures)")
    return p


def cached_data_root(scale: str, cells: list[str] | None) -> str:
    """The data modules' default cache folder, holding both splits of every dataset the selected cells use:
    missing files are downloaded through torchvision (present ones are read as they are)."""
    cache = default_cache_dir()
    for dataset in sorted({cell.dataset for cell in select_cells(SCALES[scale], cells)}):
        for train in (True, False):
            locate_split(dataset, cache, train, download=True)
    return str(cache)


def main(argv: list[str]) -> None:
    """Dispatch ``reproduce`` / ``report`` (``argv`` starts with the command name)."""
    command, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("lightning_afterkernel.reporting").setLevel(logging.INFO)
    if command == "reproduce":
        args = reproduce_parser().parse_args(rest)
        data_root = args.data_root or cached_data_root(args.scale, args.cells)
        paths = run_grid(args.out, args.scale, args.seeds, data_root, args.cells, args.accelerator)
        print(f"{len(paths)} cell files under {args.out}; next: python -m lightning_afterkernel report {args.out}")
    elif command == "report":
        args = report_parser().parse_args(rest)
        print(f"wrote {write_report(args.runs, args.out, args.figures_dir)}")
    else:
        raise SystemExit(f"unknown command {command!r}; expected one of {COMMANDS}")
