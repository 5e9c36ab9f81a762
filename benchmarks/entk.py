"""Empirical NTK: ``empirical_ntk`` beside the PyTorch tutorial's Jacobian contraction, in one run.

The baseline is ``reference_ntk(..., dtype=float32)``: ``vmap(jacrev)`` per example, then one einsum
per parameter tensor (the PyTorch NTK tutorial). Both are timed on the same inputs in the same process;
the error of each is measured against the float64 reference. Prints medians and the ratio.

    python benchmarks/entk.py                 # paper MLP n=1000 and VGG n=300 (MNIST shapes)
    python benchmarks/entk.py --n-mlp 2000 --n-vgg 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from lightning_afterkernel.kernels import empirical_ntk, reference_ntk
from lightning_afterkernel.models import MLPClassifier, VGGClassifier


def median_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rel_err(k: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(k.double() - ref) / torch.linalg.matrix_norm(ref))


def bench(name: str, model: torch.nn.Module, n: int, repeats: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(n, *model.hparams.input_shape)
    ref64 = reference_ntk(model, x, dtype=torch.float64)
    empirical_ntk(model, x[:8])  # warm-up
    t_base, k_base = median_time(lambda: reference_ntk(model, x, dtype=torch.float32), repeats)
    t_ours, k_ours = median_time(lambda: empirical_ntk(model, x), repeats)
    print(
        f"{name:<22} n={n:>5}  tutorial {t_base:7.2f} s  empirical_ntk {t_ours:7.2f} s  "
        f"speed-up {t_base / t_ours:5.2f}x  rel.err fp32: tutorial {rel_err(k_base, ref64):.1e}, "
        f"ours {rel_err(k_ours, ref64):.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-mlp", type=int, default=1000)
    parser.add_argument("--n-vgg", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, fp32 symmetric Gram, median of {args.repeats}")
    bench("MLP (MNIST, 100,675 p)", MLPClassifier(input_shape=(1, 28, 28)), args.n_mlp, args.repeats)
    bench("VGG (MNIST, 95,267 p)", VGGClassifier(input_shape=(1, 28, 28)), args.n_vgg, args.repeats)


if __name__ == "__main__":
    main()
