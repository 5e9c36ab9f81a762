"""Invariance scores (the paper's four: globalness, shift, rotation, zoom) beside the n x n Gram matrix, in one run.

On n real MNIST 3-vs-8 training images, for the paper MLP and VGG at initialisation:
``invariance_scores(model, x)`` (six transforms: one factor pass per view, (6 + 1) n per-example gradients) is
timed beside the baseline ``empirical_ntk(model, x)``, the Gram matrix a direct computation would start from,
and beside one kernel diagonal ``empirical_ntk(model, x, paired=True)`` as the unit of cost. Prints medians,
the ratio Gram / scores, the scores' cost in diagonals, and the scores themselves (NTK and CK).

    python benchmarks/invariance.py                       # n = 1000, ../shared/data
    python benchmarks/invariance.py --n 200 --repeats 3 --models mlp
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from lightning_afterkernel.data import BinaryPairDataModule
from lightning_afterkernel.invariance import invariance_scores
from lightning_afterkernel.kernels import empirical_ntk
from lightning_afterkernel.models import MLPClassifier, VGGClassifier

MODELS = {"mlp": ("MLP (MNIST, 100,675 p)", MLPClassifier), "vgg": ("VGG (MNIST, 95,267 p)", VGGClassifier)}


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench(key: str, x: torch.Tensor, repeats: int) -> None:
    name, cls = MODELS[key]
    torch.manual_seed(0)
    model = cls(input_shape=(1, 28, 28))
    empirical_ntk(model, x[:8]), invariance_scores(model, x[:4])  # warm-up
    t_gram, _ = median_time(lambda: empirical_ntk(model, x), repeats)
    t_diag, _ = median_time(lambda: empirical_ntk(model, x, paired=True), repeats)
    t_ntk, ntk = median_time(lambda: invariance_scores(model, x), repeats)
    t_ck, ck = median_time(lambda: invariance_scores(model, x, kernel="ck"), repeats)
    print(
        f"{name:<22} n={len(x):>5}  Gram {t_gram:7.2f} s  diagonal {t_diag:6.2f} s  NTK scores {t_ntk:7.2f} s "
        f"(= {t_ntk / t_diag:4.1f} diagonals)  Gram / scores {t_gram / t_ntk:5.2f}x  CK scores {t_ck:5.2f} s"
    )
    for kernel, scores in (("NTK", ntk), ("CK", ck)):
        print(f"{'':<24}{kernel:<4}" + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--root", default="../shared/data", help="folder with mnist/MNIST/raw")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "vgg"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    dm = BinaryPairDataModule(root=args.root, download=False)
    dm.setup("fit")
    x = dm.tensors("train")[0][: args.n]
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, fp32, real MNIST 3-vs-8 train[:{len(x)}], median of {args.repeats}"
    )
    for key in args.models:
        bench(key, x, args.repeats)


if __name__ == "__main__":
    main()
