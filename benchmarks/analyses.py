"""The analyses of one AfterKernelCallback evaluation at the paper's scale: today's full-spectrum route beside the
cheap one (issue 22, item 2), in one run, on the same kernels.

Kernels: the paper MLP's and VGG's on real MNIST 3-vs-8 (``../shared/data``), at initialisation and after one epoch
of plain SGD (lr 0.01, batch 32), on the first n of a fixed permutation of the training images: the empirical NTKs
(``benchmarks/svm.py``'s, cached under ``benchmarks/.cache/``) and the conjugate kernels with their features.

Per kernel, the after kernel K with the initial one K0 as reference, what an evaluation computes:

- old (the code before issue 22, copied below): KTA; alignment, CKA and relative distance to K0, each forming
  n x n temporaries; ``eigvalsh`` of K (about 40 s at n = 11,982 on a quiet 2-core CPU), both effective ranks
  and the figure's spectrum from it.
- new (``lightning_afterkernel.kernels.metrics``): the same four metrics in blocked passes; the spectral part by
  :func:`spectral_analyses`, the calls the callback is to make: the whole spectrum where it is affordable (the CK
  from its features, any kernel up to ``ENTROPY_RANK_MAX_N``), else ``effective_rank(K, "trace")`` (block Lanczos)
  and ``eigenspectrum(K, top=TOP)`` for the figure, without the entropy rank. The CK's features (one more forward
  pass over the training images, unless the callback keeps those of the CK) are timed and counted.
- callback: the route :class:`~lightning_afterkernel.AfterKernelCallback` takes today, which keeps no CK features:
  the new route with the spectral part from K for the CK too (no entropy rank above ``ENTROPY_RANK_MAX_N``).
- the hard-margin SVM (fit on K, score on the test kernel), unchanged, timed once so that the total is known.

Prints, per kernel, the old and new times (median of ``--repeats`` for the new route, one old run) with their
ratio and the largest difference of every result (ranks relative; the spectrum as |difference| / lambda_1 over the
figure's eigenvalues); then, per network, the whole evaluation's analyses against its NTK time (K_train + K_test,
measured in the same run), the issue's target being 25%.

    python benchmarks/analyses.py --quick             # the MLP at n = 5,000: a few minutes
    python benchmarks/analyses.py                     # both networks, both kernels at n = 11,982: the issue's target
    python benchmarks/analyses.py --vgg-ntk-n 2000    # the VGG's NTK at n = 2,000 only (no VGG total)

On a quiet 2-core CPU the default run takes roughly 15 minutes the first time (the old route's four eigvalsh of
12,000 x 12,000 kernels, ~40 s each, and the VGG's NTKs, ~110 s each, computed once and cached).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_afterkernel.errors import NotSeparableError
from lightning_afterkernel.kernels import conjugate_kernel, empirical_ntk_train_test
from lightning_afterkernel.kernels.metrics import (
    ENTROPY_RANK_MAX_N,
    centered_kernel_alignment,
    effective_rank,
    eigenspectrum,
    gram_eigenspectrum,
    kernel_alignment,
    kernel_distance,
    kernel_target_alignment,
)
from lightning_afterkernel.svm import HardMarginSVM, SoftMarginSVM

_spec = importlib.util.spec_from_file_location("svm_benchmark", Path(__file__).with_name("svm.py"))
svm_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(svm_benchmark)

TOP = 64
"""Eigenvalues the figure shows when the whole spectrum is not computed."""
METRICS = ("kta", "alignment", "cka", "distance", "trace_rank", "entropy_rank")


def spectral_analyses(k: Tensor, features: Tensor | None = None, top: int = TOP) -> tuple[dict[str, float], Tensor]:
    """The effective ranks and the figure's spectrum as the callback is to compute them (the proposed calls)."""
    if features is not None or len(k) <= ENTROPY_RANK_MAX_N:
        spectrum = gram_eigenspectrum(features) if features is not None else eigenspectrum(k)
        ranks = {"trace_rank": effective_rank(spectrum, "trace"), "entropy_rank": effective_rank(spectrum, "entropy")}
        return ranks, spectrum
    ranks = {"trace_rank": effective_rank(k, "trace"), "entropy_rank": math.nan}
    return ranks, eigenspectrum(k, top=top)


def new_route(k: Tensor, k0: Tensor, y: Tensor, features: Tensor | None) -> tuple[dict[str, float], Tensor]:
    out = {
        "kta": kernel_target_alignment(k, y),
        "alignment": kernel_alignment(k, k0),
        "cka": centered_kernel_alignment(k, k0),
        "distance": kernel_distance(k, k0, "frobenius"),
    }
    ranks, spectrum = spectral_analyses(k, features)
    return out | ranks, spectrum


# The route before issue 22 (lightning_afterkernel/kernels/metrics.py at af988fc), condensed: same operations.


def _old_matrix(k: Tensor) -> Tensor:
    k = k.detach().to(torch.float64)
    assert torch.isfinite(k).all()
    return k


def _old_cosine(a: Tensor, b: Tensor) -> float:
    return float(((a * b).sum() / (torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b))).clamp(-1.0, 1.0))


def _old_centred(k: Tensor) -> Tensor:
    centred = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    assert torch.linalg.matrix_norm(centred) > 1e-10 * torch.linalg.matrix_norm(k)
    return centred


def _old_ranks(eigenvalues: Tensor) -> dict[str, float]:
    largest = eigenvalues[0]
    assert largest > 0 and eigenvalues[-1] >= -1e-4 * largest
    eigenvalues = eigenvalues.clamp(min=0)
    p = eigenvalues[eigenvalues > 0] / eigenvalues.sum()
    return {"trace_rank": float(eigenvalues.sum() / largest), "entropy_rank": math.exp(float(-(p * p.log()).sum()))}


def _old_kta(k: Tensor, y: Tensor) -> float:
    k = _old_matrix(k)
    y = 2 * y.to(torch.float64) - 1
    return float((y @ k @ y / (len(y) * torch.linalg.matrix_norm(k))).clamp(-1.0, 1.0))


def old_route(k: Tensor, k0: Tensor, y: Tensor) -> tuple[dict[str, float], Tensor]:
    a, b = _old_matrix(k), _old_matrix(k0)
    out = {
        "kta": _old_kta(k, y),
        "alignment": _old_cosine(a, b),
        "cka": _old_cosine(_old_centred(_old_matrix(k)), _old_centred(_old_matrix(k0))),
        "distance": float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b)),
    }
    a = _old_matrix(k)
    assert torch.linalg.matrix_norm(a - a.mT) <= 1e-5 * torch.linalg.matrix_norm(a)
    spectrum = torch.linalg.eigvalsh((a + a.mT) / 2).flip(0)
    return out | _old_ranks(spectrum), spectrum


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def svm_accuracy(k: Tensor, y: Tensor, k_test: Tensor, y_test: Tensor) -> float:
    """The hard-margin SVM's test accuracy, or the callback's soft-margin fallback's (C = 1) where none exists."""
    try:
        return HardMarginSVM().fit(k, y).score(k_test, y_test)
    except NotSeparableError:
        return SoftMarginSVM(C=1.0).fit(k, y).score(k_test, y_test)


def compare(name: str, case: dict[str, Any], repeats: int) -> dict[str, float]:
    """Old and new routes on one kernel (float64, as the callback holds it), the SVM, and their differences."""
    k, k0, y = case["k"].double(), case["k0"].double(), case["y"]
    old_s, (old, old_spectrum) = timed(lambda: old_route(k, k0, y), 1)
    new_s, (new, spectrum) = timed(lambda: new_route(k, k0, y, case.get("features")), repeats)
    new_s += case.get("features_s", 0.0)
    kernel_s = new_s  # the callback's route: the spectral part from K whatever the kernel (it keeps no features)
    if "features" in case:
        kernel_s, _ = timed(lambda: new_route(k, k0, y, None), repeats)
    svm_s, accuracy = timed(lambda: svm_accuracy(k, y, case["k_test"].double(), case["y_test"]), 1)
    diffs = {m: abs(new[m] - old[m]) / (abs(old[m]) if m.endswith("rank") else 1.0) for m in METRICS}
    shown = min(len(spectrum), len(old_spectrum))
    diffs["spectrum"] = float((spectrum[:shown] - old_spectrum[:shown]).abs().max() / old_spectrum[0])
    text = ", ".join(f"{m} {v:.1e}" for m, v in diffs.items() if not math.isnan(v))
    print(
        f"{name} n={len(k)}: old {old_s:.2f} s, new {new_s:.2f} s"
        + (f" (features {case['features_s']:.2f} s)" if "features_s" in case else "")
        + f": {old_s / new_s:.1f}x; from K alone (the callback's route) {kernel_s:.2f} s; "
        f"SVM {svm_s:.2f} s (test accuracy {accuracy:.4f})\n"
        f"  max |new - old| (ranks relative; spectrum over its top {shown}, / lambda_1): "
        f"{text}; entropy rank {'computed' if not math.isnan(new['entropy_rank']) else 'left out'}",
        flush=True,
    )
    return {"old": old_s, "new": new_s, "callback": kernel_s, "svm": svm_s}


def ntk_case(arch: str, n: int, data: tuple) -> dict[str, Any]:
    kernels = svm_benchmark.real_kernels(arch, n, data)
    return {  # copies (the cached arrays are read-only memory maps), in float64 as the callback holds them
        "k": torch.as_tensor(kernels["after"][0], dtype=torch.float64),
        "k0": torch.as_tensor(kernels["initial"][0], dtype=torch.float64),
        "k_test": torch.as_tensor(kernels["after"][1], dtype=torch.float64),
        "y": data[1][:n],
        "y_test": data[3],
    }


def features(model: torch.nn.Module, x: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model.features(x[i : i + 1024]).flatten(1) for i in range(0, len(x), 1024)])


def ck_case(model: torch.nn.Module, initial: Tensor, n: int, data: tuple) -> dict[str, Any]:
    """The trained model's CK and features; ``initial`` is the CK at initialisation."""
    x_tr, y_tr, x_te, y_te = data
    start = time.perf_counter()
    phi = features(model, x_tr[:n])
    return {
        "k": conjugate_kernel(model, x_tr[:n]),
        "k0": initial,
        "k_test": conjugate_kernel(model, x_te, x_tr[:n]),
        "features": phi,
        "features_s": time.perf_counter() - start,
        "y": y_tr[:n],
        "y_test": y_te,
    }


def network(arch: str, n: int, n_ntk: int, data: tuple, repeats: int) -> None:
    """Both kernels of one network, then its evaluation's analyses against its NTK time."""
    x_tr, y_tr, x_te, _ = data
    torch.manual_seed(0)  # the model benchmarks/svm.py trains for its NTKs
    model = svm_benchmark.MODELS[arch](input_shape=(1, 28, 28))
    initial = conjugate_kernel(model, x_tr[:n])
    svm_benchmark.train_one_epoch(model, x_tr, y_tr)
    ck = compare(f"{arch} CK", ck_case(model, initial, n, data), repeats)
    del initial
    ntk_s, _ = timed(lambda: empirical_ntk_train_test(model, x_tr[:n_ntk], x_te), 1)
    ntk = compare(f"{arch} NTK", ntk_case(arch, n_ntk, data), repeats)
    if n_ntk != n:
        print(f"{arch}: NTK at n={n_ntk} (K_train + K_test {ntk_s:.1f} s), CK at n={n}: no evaluation total\n")
        return
    for route in ("old", "new", "callback"):
        total = ntk[route] + ck[route] + ntk["svm"] + ck["svm"]
        print(
            f"{arch} evaluation at n={n}, {route} route: analyses {total:.1f} s (SVMs {ntk['svm'] + ck['svm']:.1f} s) "
            f"= {100 * total / ntk_s:.0f}% of its NTK time {ntk_s:.1f} s (target 25%)",
            flush=True,
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the MLP only, at n = 5,000")
    parser.add_argument("--n", type=int, default=svm_benchmark.N_FULL, help="training images (default: all 11,982)")
    parser.add_argument("--vgg-ntk-n", type=int, help="training images of the VGG's NTK (default: --n)")
    parser.add_argument("--networks", nargs="+", default=["mlp", "vgg"], choices=["mlp", "vgg"])
    parser.add_argument("--repeats", type=int, default=3, help="runs of the new route for its median (default 3)")
    args = parser.parse_args()
    n = 5000 if args.quick else args.n
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    data = svm_benchmark.load_data()
    if "mlp" in args.networks:
        network("mlp", n, n, data, args.repeats)
    if not args.quick and "vgg" in args.networks:
        network("vgg", n, min(n, args.vgg_ntk_n or n), data, args.repeats)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
