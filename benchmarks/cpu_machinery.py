"""What each piece of the engine's CPU machinery (``kernels/_cpu.py``) buys, measured interleaved in one process.

Each variant switches ONE mechanism off (or all of them) and times ``empirical_ntk`` of the paper's models on random
MNIST-shaped images beside the default engine, interleaved, median of ``--repeats``; ``cpu_workers_1`` is the
one option, ``AFTERKERNEL_CPU_WORKERS=1`` (no workers side by side). Run on a quiet machine (no other process
on the cores).

    python benchmarks/cpu_machinery.py [--repeats 5] [--sizes 1000 2000] [--variants ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from lightning_afterkernel.kernels import _cpu, empirical_ntk
from lightning_afterkernel.models import MLPClassifier, VGGClassifier


@contextlib.contextmanager
def _setting(owner: object, name: str, value: object) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def _all_off() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for variant, switch in VARIANTS.items():
            if variant.startswith(("no_", "serial_")):
                stack.enter_context(switch())
        yield


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "default": contextlib.nullcontext,
    "serial_capture": lambda: _setting(_cpu, "MAX_AUTO_WORKERS", 1),
    "serial_gram": lambda: _setting(_cpu, "CONCURRENT_GRAM_WIDTH", 10**12),
    "cpu_workers_1": lambda: _env(_cpu.WORKERS_VARIABLE, "1"),
    "all_off": _all_off,
}


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(arch: str, n: int, variants: list[str], repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = (VGGClassifier if arch == "vgg" else MLPClassifier)(input_shape=(1, 28, 28)).eval()
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for variant in variants:  # warm-up: oneDNN set-up and every variant's first-call costs
        with VARIANTS[variant]():
            empirical_ntk(model, x[: min(n, 300)])
    for _ in range(repeats):
        for variant in variants:
            with VARIANTS[variant]():
                times[variant].append(_timed(lambda: empirical_ntk(model, x)))
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--archs", nargs="+", default=["vgg", "mlp"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    variants = ["default", *[v for v in args.variants if v != "default"]]
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| model | n | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for arch in args.archs:
        for n in args.sizes:
            medians = measure(arch, n, variants, args.repeats)
            base = medians["default"]
            cells = [f"{base:.3f} s"] + [f"{medians[v]:.3f} s ({medians[v] / base:.2f}x)" for v in variants[1:]]
            print(f"| {arch} | {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
