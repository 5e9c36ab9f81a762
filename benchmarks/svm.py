"""Hard-margin SVM backends on real after/initial kernels and a hard synthetic kernel, beside plain scikit-learn.

Kernels: the empirical NTK of the paper MLP and VGG on real MNIST 3-vs-8 (``../shared/data``), at
initialisation ("initial") and after one epoch of plain SGD (lr 0.01, batch 32; "after"), on the first n of
a fixed permutation of the 11,982 training images (so a smaller n is a corner of the largest kernel) and on
the 1,984 test images. Plus "hard": an RBF kernel (gamma 0.002) on the same MNIST pixels with 10% of the
training labels flipped, separable but slow for SMO (test labels stay true). The eNTKs are cached under
``benchmarks/.cache/`` (float32 ``.npy``; a smaller n reuses a larger cached kernel), so reruns are cheap.

For each kernel and n, in one run: plain ``SVC(kernel="precomputed", C=1e10)`` (the baseline: libsvm as is,
with a bias, no checks) and ``HardMarginSVM(backend=...)`` for each installed backend (no bias, the paper's
formulation; every check included): fit time (median of ``--repeats``, more for fits under a second; one run
when a fit takes over 30 s),
solver iterations, dual objective (float64, normalised kernel), minimum training margin, test accuracy,
support vectors, and the time ratio to the baseline.

    python benchmarks/svm.py --sizes 2000                           # quick
    python benchmarks/svm.py --sizes 2000 5000 11982 --models mlp   # the MLP kernels at every size
    python benchmarks/svm.py --prepare --sizes 11982                 # only compute and cache the kernels
    python benchmarks/svm.py --sizes 11982 --device cuda --solver-device cuda --backends auto torch   # a GPU
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.svm import SVC

from lightning_afterkernel.data import BinaryPairDataModule
from lightning_afterkernel.errors import SolverError
from lightning_afterkernel.kernels import empirical_ntk
from lightning_afterkernel.models import MLPClassifier, VGGClassifier
from lightning_afterkernel.svm import HardMarginSVM, available_backends
from lightning_afterkernel.svm.sklearn_backend import run_with_time_limit

CACHE = Path(__file__).resolve().parent / ".cache"
DATA_ROOT = Path(os.environ.get("AFTERKERNEL_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
"""The real data: ``AFTERKERNEL_DATA`` if set, else ``../shared/data`` beside the project (as in the tests)."""
N_FULL = 11_982
MODELS = {"mlp": MLPClassifier, "vgg": VGGClassifier}
SLOW = 30.0
"""Seconds after which a solver is not run again for the median."""
FAST_SECONDS, FAST_REPEATS = 1.0, 15
"""Fits that take well under a second are repeated until FAST_SECONDS (at most FAST_REPEATS fits in all): a median
of 3 varies 1.5x at 0.02-0.05 s."""


WARMED_UP = ("auto", "sklearn", "cuml")
"""The baseline and these (fast) solvers fit once untimed first. The first fits of a process that allocate a
fresh n^2 float64 array (every solver here converts the float32 kernel) can take 5-15x longer while the kernel
compacts memory for numpy's transparent huge pages (n = 5,000: 0.3-0.5 s instead of 25 ms for the copy alone).
Not the slow solvers (seconds to minutes per fit), where it would not show."""


def _more(times: list[float], repeats: int) -> bool:
    """Whether to time one more fit."""
    if sum(times) >= SLOW:
        return False
    return len(times) < repeats or (sum(times) < FAST_SECONDS and len(times) < FAST_REPEATS)


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) of MNIST 3-vs-8, the training set in a fixed random order."""
    dm = BinaryPairDataModule(root=str(DATA_ROOT), download=False)
    dm.setup("fit")
    x_tr, y_tr = dm.tensors("train")
    x_te, y_te = dm.tensors("test")
    order = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(0))
    return x_tr[order], y_tr[order], x_te, y_te


def train_one_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The paper's training: logistic loss, plain SGD lr 0.01, batch 32, one epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1)).to(y.device)
    model.train()
    for i in range(0, len(y), 32):
        idx = order[i : i + 32]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx].float())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _cached(model_name: str, kind: str, n: int) -> tuple[Path, Path] | None:
    """Paths of a cached kernel pair covering the first n training examples (the smallest such), if any."""
    best = None
    for path in CACHE.glob(f"{model_name}_{kind}_*_train.npy"):
        m = int(path.stem.split("_")[2])
        if m >= n and (best is None or m < best):
            best = m
    if best is None:
        return None
    stem = CACHE / f"{model_name}_{kind}_{best}"
    return Path(f"{stem}_train.npy"), Path(f"{stem}_test.npy")


def real_kernels(model_name: str, n: int, data: tuple, device: str = "cpu") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"initial": (K_train n x n, K_test 1984 x n), "after": ...}, computed once (on ``device``) and cached."""
    missing = [kind for kind in ("initial", "after") if _cached(model_name, kind, n) is None]
    if missing:
        x_tr, y_tr, x_te, _ = data
        torch.manual_seed(0)
        model = MODELS[model_name](input_shape=(1, 28, 28)).to(device)
        x_tr, y_tr = x_tr.to(device), y_tr.to(device)
        CACHE.mkdir(exist_ok=True)
        for kind in ("initial", "after"):
            if kind == "after":
                t0 = time.perf_counter()
                train_one_epoch(model, x_tr, y_tr)
                print(f"  {model_name}: one epoch of SGD in {time.perf_counter() - t0:.0f} s", flush=True)
            if kind not in missing:
                continue
            t0 = time.perf_counter()
            with torch.no_grad():
                k_train = empirical_ntk(model, x_tr[:n], device=device).cpu().numpy()
                k_test = empirical_ntk(model, x_te, x_tr[:n], device=device).cpu().numpy()
            stem = CACHE / f"{model_name}_{kind}_{n}"
            np.save(f"{stem}_test.npy", k_test)
            np.save(f"{stem}_train.npy", k_train)  # written last: its presence marks a complete pair
            print(f"  {model_name} {kind} kernel n={n}: {time.perf_counter() - t0:.0f} s", flush=True)
    out = {}
    for kind in ("initial", "after"):
        train_path, test_path = _cached(model_name, kind, n)
        k_train = np.load(train_path, mmap_mode="r")[:n, :n]
        k_test = np.load(test_path, mmap_mode="r")[:, :n]
        out[kind] = (np.ascontiguousarray(k_train), np.ascontiguousarray(k_test))
    return out


def hard_kernel(x: torch.Tensor, y: torch.Tensor, n: int, x_test: torch.Tensor) -> tuple[np.ndarray, ...]:
    """RBF kernel (gamma 0.002) on MNIST pixels with 10% of the training labels flipped (seeded): separable
    (an RBF kernel is positive definite) but with many support vectors and large alphas, slow for SMO.
    Returns (K_train, y_train flipped, K_test); test labels stay true."""
    xs, xt = x[:n].flatten(1).double(), x_test.flatten(1).double()
    sq, sq_t = (xs**2).sum(1), (xt**2).sum(1)
    k_train = torch.exp(-0.002 * (sq[:, None] + sq[None, :] - 2.0 * xs @ xs.T).clamp_min(0.0))
    k_test = torch.exp(-0.002 * (sq_t[:, None] + sq[None, :] - 2.0 * xt @ xs.T).clamp_min(0.0))
    flip = torch.rand(n, generator=torch.Generator().manual_seed(2)) < 0.1
    y_flip = torch.where(flip, 1 - y[:n], y[:n])
    return k_train.numpy(), y_flip.numpy(), k_test.numpy()


def baseline(k_train, y, k_test, y_test, time_limit: float, repeats: int) -> dict:
    """Plain ``SVC(kernel="precomputed", C=1e10)`` (with a bias: libsvm has no other formulation), in a child
    process bounded by ``time_limit``; median time of ``repeats`` fits (one if the first takes over 30 s)."""

    def fit() -> tuple[float, float, float]:
        SVC(kernel="precomputed", C=1e10).fit(k_train, y)  # warm-up, untimed (see WARM_UP)
        times = []
        while _more(times, repeats):
            t0 = time.perf_counter()
            svc = SVC(kernel="precomputed", C=1e10).fit(k_train, y)
            times.append(time.perf_counter() - t0)
        margins = (2.0 * y - 1.0) * svc.decision_function(k_train)
        return statistics.median(times), float(margins.min()), float(svc.score(k_test, y_test))

    try:
        seconds, margin, acc = run_with_time_limit(fit, (), time_limit)
    except TimeoutError:
        return {"solver": "plain SVC (bias)", "time": math.inf, "note": f"> {time_limit:g} s"}
    return {"solver": "plain SVC (bias)", "time": seconds, "iter": None, "dual": None, "margin": margin, "acc": acc}


def run_backend(
    backend: str, k_train, y, k_test, y_test, time_limit: float, repeats: int, device: str | None = None
) -> dict:
    """``HardMarginSVM(backend=backend)``: median ``fit_time_`` of ``repeats`` fits (one if the first takes > 30 s).

    ``device`` goes to the interior-point backends ("auto", "torch"); the kernel is handed over as a numpy array
    (copied to the device inside the fit, which the time includes)."""
    options = {"device": device} if device is not None and backend in ("auto", "torch") else {}
    times = []
    if backend in WARMED_UP or (device or "cpu").startswith("cuda"):  # on a GPU: CUDA and cuSOLVER start-up too
        try:
            HardMarginSVM(backend=backend, time_limit=time_limit, **options).fit(k_train, y)  # untimed, WARM_UP
        except SolverError:
            pass  # reported by the timed fit below
    while _more(times, repeats):
        est = HardMarginSVM(backend=backend, time_limit=time_limit, **options)
        try:
            est.fit(k_train, y)
        except SolverError as err:
            return {"solver": backend, "time": math.inf, "note": f"{type(err).__name__}: {str(err)[:90]}"}
        times.append(est.fit_time_)
    return {
        "solver": backend,
        "route": est.backend_,
        "time": statistics.median(times),
        "iter": est.n_iter_,
        "dual": est.dual_objective_,
        "margin": est.min_margin_,
        "acc": est.score(k_test, y_test),
        "n_sv": est.n_support_,
    }


def report(name: str, n: int, rows: list[dict]) -> None:
    base = rows[0]["time"]
    duals = {r["solver"]: r["dual"] for r in rows if r.get("dual") is not None}
    ratio = ""
    if "torch" in duals and "sklearn" in duals:
        ratio = f"  (torch dual / sklearn dual - 1 = {duals['torch'] / duals['sklearn'] - 1:.1e})"
    print(f"\n{name}, n = {n:,}{ratio}")
    header = ("solver", "route", "time", "x SVC", "iter", "dual objective", "min margin", "test acc", "SVs")
    print("  {:<18} {:<15} {:>9} {:>7} {:>6} {:>18} {:>14} {:>9} {:>6}".format(*header))
    for r in rows:
        if "note" in r:
            print(f"  {r['solver']:<18} {'':<15} {'-':>9} {'-':>7}  {r['note']}")
            continue
        dual = "" if r["dual"] is None else f"{r['dual']:.10g}"
        it = "" if r["iter"] is None else str(r["iter"])
        times = "     -" if math.isinf(base) else f"{r['time'] / base:6.2f}x"
        print(
            f"  {r['solver']:<18} {r.get('route', ''):<15} {r['time']:8.2f}s {times} {it:>6} "
            f"{dual:>18} {r['margin']:14.10f} {r['acc']:9.4f} {r.get('n_sv', ''):>6}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument(
        "--kinds", nargs="+", choices=["initial", "after", "hard"], default=["initial", "after", "hard"]
    )
    parser.add_argument("--backends", nargs="+", default=[b for b in available_backends()])
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per fit (default 600)")
    parser.add_argument("--repeats", type=int, default=3, help="fits per solver for the median time (default 3)")
    parser.add_argument(
        "--thundersvm-max-n", type=int, default=2000, help="skip thundersvm above this n (it took 40-100 s at 2,000)"
    )
    parser.add_argument("--prepare", action="store_true", help="only compute and cache the kernels")
    parser.add_argument("--device", default="cpu", help="where to compute missing kernels (e.g. cuda)")
    parser.add_argument(
        "--solver-device", default=None, help="device= of the 'auto' and 'torch' backends (e.g. cuda); default CPU"
    )
    args = parser.parse_args()
    data = load_data()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), scikit-learn {sklearn.__version__}; no bias (the paper's formulation), "
        "normalised kernels; dual objective and margins in float64 on the normalised kernel"
    )
    for n in sorted(args.sizes):
        cases = []
        if "hard" in args.kinds and not args.prepare:
            k_train, y_flip, k_test = hard_kernel(data[0], data[1], n, data[2])
            cases.append(("hard: RBF on pixels, 10% flipped labels", k_train, y_flip, k_test))
        for model_name in args.models:
            kernels = real_kernels(model_name, n, data, args.device)
            for kind in ("initial", "after"):
                if kind in args.kinds:
                    k_train, k_test = kernels[kind]
                    cases.append((f"{model_name.upper()} {kind} kernel (eNTK)", k_train, data[1][:n].numpy(), k_test))
        if args.prepare:
            continue
        y_test = data[3].numpy()
        for name, k_train, y, k_test in cases:
            rows = [baseline(k_train, y, k_test, y_test, args.time_limit, args.repeats)]
            backends = [b for b in args.backends if b != "thundersvm" or n <= args.thundersvm_max_n]
            rows += [
                run_backend(b, k_train, y, k_test, y_test, args.time_limit, args.repeats, args.solver_device)
                for b in backends
            ]
            report(name, n, rows)


if __name__ == "__main__":
    main()
