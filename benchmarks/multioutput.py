"""The trace eNTK of 10-logit networks beside the one-logit kernel of the same architecture, in one run.

The paper's VGG and MLP with ``num_classes=10`` (widths from the same parameter budget) against ``num_classes=1``,
``empirical_ntk(model, x)`` (float32, symmetric Gram matrix) on random images, interleaved, median of ``--repeats``;
prints each time and the ratio (target on CPU: the 10-logit VGG trace kernel at n = 1,000 in at most 12x the
one-logit kernel's time). ``--full`` also times ``outputs="full"``. On a GPU, ``--gpu-target`` times the 10-logit VGG
trace kernel of 10,000 CIFAR-10-shaped images (target: at most 15 s on an H100/H200).

    python benchmarks/multioutput.py [--n 1000] [--repeats 3] [--full]
    python benchmarks/multioutput.py --device cuda --gpu-target
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from lightning_afterkernel.kernels import empirical_ntk
from lightning_afterkernel.models import MLPClassifier, VGGClassifier

SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
ARCHS = {"vgg": VGGClassifier, "mlp": MLPClassifier}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def compare(arch: str, data: str, n: int, repeats: int, device: str, modes: list[str]) -> dict[str, float]:
    """Median seconds of the one-logit kernel and of the 10-logit kernel in each mode."""
    models = {}
    for k in (1, 10):
        torch.manual_seed(0)
        models[k] = ARCHS[arch](input_shape=SHAPES[data], num_classes=k).eval().to(device)
    x = torch.rand(n, *SHAPES[data], generator=torch.Generator().manual_seed(1)).to(device)
    runs = {"1 logit": lambda: empirical_ntk(models[1], x)}
    for mode in modes:
        runs[f"10 logits, {mode}"] = lambda mode=mode: empirical_ntk(models[10], x, outputs=mode)
    empirical_ntk(models[1], x[:64])  # warm-up (oneDNN set-up, memory-format choices)
    for mode in modes:
        empirical_ntk(models[10], x[:64], outputs=mode)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_timed(run, device))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--archs", nargs="+", default=["vgg", "mlp"])
    parser.add_argument("--full", action="store_true", help="also time outputs='full' (k^2 the Gram work)")
    parser.add_argument("--gpu-target", action="store_true", help="the 10-logit VGG on 10,000 CIFAR-10 images")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# {name}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.gpu_target:
        seconds = compare("vgg", "cifar10", 10_000, args.repeats, args.device, ["trace"])
        print(f"10-logit VGG trace kernel, 10,000 CIFAR-10 images: {seconds['10 logits, trace']:.2f} s (target 15 s)")
        return
    modes = ["trace", "full"] if args.full else ["trace"]
    print("| model | n | 1 logit | " + " | ".join(f"10 logits, {m}" for m in modes) + " |")
    print("|---|---|---|" + "---|" * len(modes))
    for arch in args.archs:
        seconds = compare(arch, "mnist", args.n, args.repeats, args.device, modes)
        base = seconds["1 logit"]
        cells = [f"{seconds[f'10 logits, {m}']:.2f} s ({seconds[f'10 logits, {m}'] / base:.1f}x)" for m in modes]
        print(f"| {arch} | {args.n} | {base:.2f} s | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
