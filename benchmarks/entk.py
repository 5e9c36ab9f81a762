"""Empirical NTK engine beside the PyTorch tutorial's Jacobian contraction, in one run.

Baseline: the PyTorch NTK tutorial's ``empirical_ntk_jacobian_contraction``, as written there
(``vmap(jacrev)`` per example for x1 and for x2, then ``einsum('Naf,Mbf->NMab')`` per parameter tensor,
summed), in float32. Also timed: ``reference_ntk(..., dtype=float32)``, the same method with the Jacobian
shared when x2 is x1 (a stronger baseline for a symmetric Gram matrix). Each comparison times them and
``empirical_ntk`` on the same inputs in the same process, interleaved (median of ``--repeats``), and
measures the float32 kernels against the float64 reference; the float64 engine is checked against it too.

The scaling table runs each point in a fresh child process, so that its peak memory (peak RSS on CPU,
peak allocated CUDA memory on a GPU) is its own. The memory check computes the MLP kernel at the largest
n with the default budget and with ``--small-budget`` and compares the two.

    python benchmarks/entk.py                        # the targets: MLP n=2000, VGG n=1000, CIFAR shapes
    python benchmarks/entk.py --scaling 1000 2000 4000 8000 12000 --memory-check 12000
    python benchmarks/entk.py --device cuda --full-split ../shared/data --full-split-tutorial   # a GPU

On a GPU the tutorial runs in exact fp32 (TF32 off, like the engine); the full split also times it with TF32 on
(cuDNN convolutions, PyTorch's default, and matmuls).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, jacrev, vmap

from lightning_afterkernel.kernels import empirical_ntk, empirical_ntk_train_test, reference_ntk
from lightning_afterkernel.kernels._settings import tf32
from lightning_afterkernel.models import MLPClassifier, VGGClassifier

SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
ARCHS = {"mlp": MLPClassifier, "vgg": VGGClassifier}


def tutorial_ntk(model: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The PyTorch NTK tutorial's Jacobian contraction, as written there (model in eval mode)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def fnet_single(p, x):
        return functional_call(model, (p, buffers), (x.unsqueeze(0),))

    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    result = torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2, strict=True)])
    return result.sum(0)[:, :, 0, 0]


def make_model(arch: str, data: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ARCHS[arch](input_shape=SHAPES[data]).eval()


def inputs(data: str, n: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, *SHAPES[data], generator=generator).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device: str) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def rel_err(kernel: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative Frobenius (for matrices; Euclidean for any other shape) distance, in float64 on the CPU."""
    kernel, reference = kernel.double().cpu(), reference.double().cpu()
    return float(torch.linalg.vector_norm(kernel - reference) / torch.linalg.vector_norm(reference))


def compare(arch: str, data: str, n: int, repeats: int, device: str, n_ref: int) -> dict:
    """Engine vs tutorial on n examples; errors against the float64 reference on the first n_ref."""
    model = make_model(arch, data).to(device)
    x = inputs(data, n, device)
    methods = {
        "tutorial": lambda: tutorial_ntk(model, x, x),
        "shared_jacobian": lambda: reference_ntk(model, x, dtype=torch.float32),
        "engine": lambda: empirical_ntk(model, x),
    }
    for method in methods.values():  # warm-up (allocator, oneDNN primitives)
        method()
    times: dict[str, list[float]] = {name: [] for name in methods}
    kernels = {}
    for _ in range(repeats):
        for name, method in methods.items():
            seconds, kernels[name] = median_time(method, 1, device)
            times[name].append(seconds)
    t_base, t_shared, t_ours = (statistics.median(times[name]) for name in methods)
    k_base, k_ours = kernels["tutorial"], kernels["engine"]
    m = min(n, n_ref)
    ref64 = reference_ntk(model, x[:m], dtype=torch.float64)
    ours64 = empirical_ntk(model, x[:m], dtype=torch.float64)
    row = {
        "model": f"{arch} ({data})",
        "params": sum(p.numel() for p in model.parameters()),
        "n": n,
        "tutorial_s": t_base,
        "shared_jacobian_s": t_shared,
        "engine_s": t_ours,
        "speedup": t_base / t_ours,
        "speedup_vs_shared_jacobian": t_shared / t_ours,
        "err_fp32_tutorial": rel_err(k_base[:m, :m], ref64),
        "err_fp32_engine": rel_err(k_ours[:m, :m], ref64),
        "err_fp64_engine": rel_err(ours64, ref64),
        "engine_vs_tutorial_fp32": rel_err(k_ours, k_base),
    }
    print(
        f"{row['model']:<15} {row['params']:>7,} p  n={n:>5}  tutorial {t_base:7.3f} s  shared-Jacobian "
        f"{t_shared:7.3f} s  engine {t_ours:7.3f} s  speed-up {row['speedup']:6.1f}x "
        f"({row['speedup_vs_shared_jacobian']:.1f}x)  | rel. error vs float64 (first {m}): fp32 tutorial "
        f"{row['err_fp32_tutorial']:.1e}, fp32 engine {row['err_fp32_engine']:.1e}, fp64 engine "
        f"{row['err_fp64_engine']:.1e}",
        flush=True,
    )
    return row


def one_point(arch: str, data: str, n: int, device: str, budget: str | None, save: str | None) -> dict:
    """One scaling point, meant to run in its own process (its peak memory is the process's)."""
    model = make_model(arch, data).to(device)
    x = inputs(data, n, device)
    empirical_ntk(model, x[:16])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    kernel = empirical_ntk(model, x, memory_budget=budget)
    sync(device)
    seconds = time.perf_counter() - start
    if save:
        torch.save(kernel.cpu(), save)
    peak = (
        torch.cuda.max_memory_allocated()
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"model": f"{arch} ({data})", "n": n, "seconds": seconds, "peak_bytes": peak, "budget": budget}


def child(arch: str, data: str, n: int, device: str, budget: str | None = None, save: str | None = None) -> dict:
    command = [sys.executable, __file__, "--one", arch, data, str(n), "--device", device]
    command += ["--budget", budget] if budget else []
    command += ["--save", save] if save else []
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


TARGETS = {"vgg": 10.0, "mlp": 2.0}
"""The issue's GPU targets for the full split (seconds for K_train + K_test)."""


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0


def full_split(root: str, device: str, repeats: int, tutorial: bool, profile: bool, limit: int = 0) -> list[dict]:
    """The after kernel of the paper's models on the full MNIST 3-vs-8 split: K_train and K_test, with time and
    peak memory, and the fp32 kernels' relative errors against the engine's float64 kernels (checked against the
    float64 reference in the comparisons). With ``tutorial``, the tutorial's Jacobian contraction on the same
    inputs once in exact fp32 (the ratio) and once with TF32 on (convolutions and matmuls, on a GPU);
    with ``profile``, the heaviest operators of one engine run that missed its target. ``limit`` > 0 keeps the
    first ``limit`` training and ``limit // 6`` test images (a smoke test)."""
    from lightning_afterkernel.data import BinaryPairDataModule

    dm = BinaryPairDataModule(root=root, download=False)
    dm.setup("fit")
    x_train, x_test = dm.tensors("train")[0].to(device), dm.tensors("test")[0].to(device)
    if limit:
        x_train, x_test = x_train[:limit], x_test[: max(1, limit // 6)]
    rows = []
    for arch in ("vgg", "mlp"):
        model = make_model(arch, "mnist").to(device)
        empirical_ntk_train_test(model, x_train[:64], x_test[:16])
        _peak_reset(device)
        seconds, fp32 = median_time(lambda m=model: empirical_ntk_train_test(m, x_train, x_test), repeats, device)
        row = {"model": arch, "n_train": len(x_train), "n_test": len(x_test), "seconds": seconds, "peak": _peak(device)}
        print(
            f"full split {arch}: K_train {len(x_train)}^2 + K_test {len(x_test)}x{len(x_train)} in {seconds:.2f} s "
            f"(target {TARGETS[arch]:g} s), peak {row['peak'] / 2**30:.2f} GiB",
            flush=True,
        )
        fp64_seconds, fp64 = median_time(
            lambda m=model: empirical_ntk_train_test(m, x_train, x_test, dtype=torch.float64), 1, device
        )
        row.update(fp64_s=fp64_seconds, err_fp32_engine=_error(fp32, fp64))
        print(
            f"full split {arch}: float64 engine {fp64_seconds:.2f} s; fp32 engine vs it (relative Frobenius, K_train / "
            f"K_test) {row['err_fp32_engine']}",
            flush=True,
        )
        if profile and seconds > TARGETS[arch]:
            _profile(lambda m=model: empirical_ntk_train_test(m, x_train, x_test), device)
        for variant, allow in [("tutorial", False), ("tutorial_tf32", True)] if tutorial else []:
            try:
                with tf32(torch.device(device), allow):
                    tutorial_ntk(model, x_train[:64], x_test[:16])  # warm-up
                    _peak_reset(device)
                    t_seconds, kernels = median_time(
                        lambda m=model: (tutorial_ntk(m, x_train, x_train), tutorial_ntk(m, x_test, x_train)),
                        1,
                        device,
                    )
                row.update(
                    {
                        f"{variant}_s": t_seconds,
                        f"{variant}_peak": _peak(device),
                        f"{variant}_speedup": t_seconds / seconds,
                        f"err_fp32_{variant}": _error(kernels, fp64),
                    }
                )
                print(
                    f"full split {arch}: {variant} {t_seconds:.2f} s, peak {_peak(device) / 2**30:.2f} GiB: engine "
                    f"speed-up {t_seconds / seconds:.1f}x; its error vs the float64 engine {_error(kernels, fp64)}",
                    flush=True,
                )
                del kernels
            except torch.cuda.OutOfMemoryError as err:
                row[f"{variant}_s"] = None
                print(f"full split {arch}: {variant} ran out of memory: {str(err)[:200]}", flush=True)
        del fp32, fp64
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _error(kernels: tuple[torch.Tensor, ...], fp64: tuple[torch.Tensor, ...]) -> str:
    """The relative Frobenius errors of (K_train, K_test) against the float64 pair."""
    return " / ".join(f"{rel_err(k, k64):.1e}" for k, k64 in zip(kernels, fp64, strict=True))


def _profile(fn, device: str) -> None:
    """One run of fn under torch.profiler: the operators with the most self time (device time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-n", type=int, nargs=2, default=(2000, 1000), metavar=("N_MLP", "N_VGG"))
    parser.add_argument("--cifar-n", type=int, default=500, help="n of the CIFAR-10-shape comparisons")
    parser.add_argument("--reference-n", type=int, default=500, help="examples in the float64 error check")
    parser.add_argument("--scaling", type=int, nargs="*", default=[], help="n values of the scaling table")
    parser.add_argument("--scaling-models", nargs="*", default=["mlp:mnist", "vgg:mnist", "mlp:cifar10", "vgg:cifar10"])
    parser.add_argument("--memory-check", type=int, default=0, help="n of the MLP memory-budget check")
    parser.add_argument("--small-budget", default="1GiB")
    parser.add_argument("--full-split", default="", help="data root: time the full MNIST 3-vs-8 kernels")
    parser.add_argument("--full-split-tutorial", action="store_true", help="time the tutorial there too (once)")
    parser.add_argument("--profile", action="store_true", help="profile a full-split run that misses its target")
    parser.add_argument("--full-split-limit", type=int, default=0, help=argparse.SUPPRESS)  # smoke tests
    parser.add_argument("--json", default="", help="write every row here")
    parser.add_argument("--one", nargs=3, metavar=("ARCH", "DATA", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--budget", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        arch, data, n = args.one
        print(json.dumps(one_point(arch, data, int(n), args.device, args.budget, args.save)))
        return

    card = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    )
    print(
        f"machine: {card}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; fp32 symmetric Gram "
        f"matrices, median of {args.repeats}",
        flush=True,
    )
    rows: dict[str, list] = {"compare": [], "scaling": [], "memory": [], "full_split": []}

    def save() -> None:  # after every stage, so that a run stopped at a time limit keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))

    if args.full_split:  # first: on a GPU it is the target
        rows["full_split"] = full_split(
            args.full_split, args.device, args.repeats, args.full_split_tutorial, args.profile, args.full_split_limit
        )
        save()
    n_mlp, n_vgg = args.compare_n
    for arch, data, n in [("mlp", "mnist", n_mlp), ("vgg", "mnist", n_vgg)] + [
        (arch, "cifar10", args.cifar_n) for arch in ("mlp", "vgg")
    ]:
        if n:  # the tutorial in exact fp32, like the engine (PyTorch's default: TF32 cuDNN convolutions)
            with tf32(torch.device(args.device), False):
                rows["compare"].append(compare(arch, data, n, args.repeats, args.device, args.reference_n))
            save()
    for spec in args.scaling_models if args.scaling else []:
        arch, data = spec.split(":")
        for n in args.scaling:
            row = child(arch, data, n, args.device)
            rows["scaling"].append(row)
            print(
                f"scaling {row['model']:<15} n={n:>6}  {row['seconds']:8.2f} s  "
                f"peak {row['peak_bytes'] / 2**30:6.2f} GiB",
                flush=True,
            )
    if args.memory_check:
        n = args.memory_check
        default = child("mlp", "mnist", n, args.device, save="/tmp/entk_default.pt")
        small = child("mlp", "mnist", n, args.device, budget=args.small_budget, save="/tmp/entk_small.pt")
        diff = float((torch.load("/tmp/entk_default.pt") - torch.load("/tmp/entk_small.pt")).abs().max())
        rows["memory"] += [default, small]
        for row in (default, small):
            print(
                f"memory  MLP (mnist) n={n}  budget {row['budget'] or 'default'}: {row['seconds']:.2f} s, peak "
                f"{row['peak_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )
        print(f"memory  max |K_default - K_small_budget| = {diff:.1e}", flush=True)
    save()


if __name__ == "__main__":
    main()
