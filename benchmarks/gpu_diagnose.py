"""The float32 after kernel's error on real MNIST on a GPU, broken down (a diagnosis, kept for later GPU sessions).

On an H200 the float32 engine's full-split VGG kernel once differed from its float64 kernel by 2.9e-2 while the
tutorial's differed by 3e-5. The cause (convolution algorithms that return noise over all-zero patches, opening
ReLU gates at the zero-bias initialisation) is fixed in the capture (`kernels/_layouts.py`): on CUDA cuDNN's
convolutions with the outputs over all-zero patches set to the bias (`_structured.LIBRARY_CONVOLUTION_DEVICES`),
elsewhere off oneDNN CPUs im2col times the weight. This script shows what is left: errors against the float64
reference by implementation, batch size, memory budget, data and cuDNN settings, both routes side by side with
their times (at n = 2,000 and 6,000 and on the full split), the captured layer factors against plain autograd,
both routes and the tutorial on random CIFAR-shaped images, and whether the error is in the float32 factors or
in their products (the same factors multiplied in float64; on the H200: in the factors).

    python benchmarks/gpu_diagnose.py .gpu_data cuda 2000,6000     # on a GPU (gpu_checks.sh step "diagnose")
    python benchmarks/gpu_diagnose.py ../shared/data cpu 400       # the same on CPU (toy sizes for the last parts)
    python benchmarks/gpu_diagnose.py .gpu_data cuda --last         # only the last parts (random images, factors or
                                                                   # products, the full split by route)
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import entk  # noqa: E402

from lightning_afterkernel.data import BinaryPairDataModule  # noqa: E402
from lightning_afterkernel.kernels import _gram, empirical_ntk, empirical_ntk_train_test, reference_ntk  # noqa: E402
from lightning_afterkernel.kernels import _structured as st  # noqa: E402
from lightning_afterkernel.kernels._settings import tf32  # noqa: E402


def err(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{entk.rel_err(a, b):.1e}"


@contextmanager
def gemm_convolutions(on: bool):
    """The capture's im2col convolutions on or off on every device (off: the library's, exact over all-zero
    patches only)."""
    before = st.GEMM_CONVOLUTIONS, st.LIBRARY_CONVOLUTION_DEVICES
    st.GEMM_CONVOLUTIONS, st.LIBRARY_CONVOLUTION_DEVICES = on, frozenset()
    try:
        yield
    finally:
        st.GEMM_CONVOLUTIONS, st.LIBRARY_CONVOLUTION_DEVICES = before


@contextmanager
def float64_products():
    """The engine's factor products in float64, from its float32 factors (rounded back to float32)."""
    before = _gram._factor_product

    def product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(a.double() @ b.double().mT)

    _gram._factor_product = product
    try:
        yield
    finally:
        _gram._factor_product = before


def factors_or_products(xtr: torch.Tensor, dev: str, sizes: tuple[int, ...]) -> None:
    """Whether the float32 VGG kernel's error is in its factors (the capture's rounding, e.g. ReLU gates that
    flip) or in their products (cuBLAS's running sums over 95,267 parameters): every layer materialised, so every
    product goes through _gram._factor_product, once in float32 and once in float64."""
    model = entk.make_model("vgg", "mnist").to(dev)
    for n in sizes:
        x = xtr[:n]
        k64 = empirical_ntk(model, x, dtype=torch.float64)
        one = empirical_ntk(model, x, implementation="materialised")
        with float64_products():
            exact = empirical_ntk(model, x, implementation="materialised")
        structured = empirical_ntk(model, x, implementation="structured")
        print(
            f"vgg n={n}: materialised, float32 products {err(one, k64)}; the same factors, float64 products "
            f"{err(exact, k64)}; structured {err(structured, k64)}",
            flush=True,
        )


def routes_on_random(dev: str, n: int) -> None:
    """Both convolution routes and the tutorial on random CIFAR-shaped images (no all-zero patches: the correction
    changes nothing), where max-pool near-ties make every change of rounding a coin toss."""
    model = entk.make_model("vgg", "cifar10").to(dev)
    x = entk.inputs("cifar10", n, dev)
    k64 = reference_ntk(model, x)
    cells = []
    for on in (True, False):
        with gemm_convolutions(on):
            cells.append(f"{'im2col' if on else 'cuDNN + correction'} {err(empirical_ntk(model, x), k64)}")
    with tf32(torch.device(dev), allow=False):  # IEEE float32, as the engine (cuDNN defaults to TF32)
        cells.append(f"tutorial {err(entk.tutorial_ntk(model, x, x), k64)}")
    print(f"vgg cifar10 random n={n}: " + ", ".join(cells), flush=True)


def routes_on_full_split(xtr: torch.Tensor, xte: torch.Tensor, dev: str) -> None:
    """The VGG's K_train and K_test of the full split by convolution route: errors and median times."""
    if dev == "cpu":  # toy sizes, to check the code runs
        xtr, xte = xtr[:300], xte[:60]
    model = entk.make_model("vgg", "mnist").to(dev)
    t64, s64 = empirical_ntk_train_test(model, xtr, xte, dtype=torch.float64)
    for on in (False, True):
        with gemm_convolutions(on):
            seconds, (t32, s32) = entk.median_time(partial(empirical_ntk_train_test, model, xtr, xte), 3, dev)
        route = "im2col convolutions" if on else "library convolutions + zero-patch correction"
        print(
            f"vgg full split {len(xtr)}+{len(xte)}, {route}: K_train {err(t32, t64)} K_test {err(s32, s64)} "
            f"({seconds:.2f} s)",
            flush=True,
        )
        del t32, s32


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else ".gpu_data"
    dev = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    last = "--last" in sys.argv
    sizes = [int(v) for v in sys.argv[3].split(",")] if len(sys.argv) > 3 and not last else [2000, 6000]
    dm = BinaryPairDataModule(root=root, download=False)
    dm.setup("fit")
    xtr, xte = dm.tensors("train")[0].to(dev), dm.tensors("test")[0].to(dev)
    if last:
        last_parts(xtr, xte, dev)
        return
    model = entk.make_model("vgg", "mnist").to(dev)
    card = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    print(card, torch.__version__, "cudnn", torch.backends.cudnn.version(), flush=True)
    print("tf32 flags:", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, flush=True)

    x, xt = xtr[:300], xte[:100]
    xr = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(dev)
    ref = reference_ntk(model, x)
    ref_cross = reference_ntk(model, xt, x)
    ref_r = reference_ntk(model, xr)
    on_cpu = reference_ntk(model.cpu(), x.cpu())
    print("float64 reference on the card vs on the CPU (real):", err(ref, on_cpu), flush=True)
    model.to(dev)
    rows = [
        ("engine auto", lambda: empirical_ntk(model, x)),
        ("engine structured", lambda: empirical_ntk(model, x, implementation="structured")),
        ("engine materialised", lambda: empirical_ntk(model, x, implementation="materialised")),
        ("engine vmap", lambda: empirical_ntk(model, x, implementation="vmap")),
        ("engine batch_size=1", lambda: empirical_ntk(model, x, batch_size=1)),
        ("engine batch_size=16", lambda: empirical_ntk(model, x, batch_size=16)),
        ("engine batch_size=300", lambda: empirical_ntk(model, x, batch_size=300)),
        ("engine memory_budget=64MB", lambda: empirical_ntk(model, x, memory_budget="64MB")),
        ("engine float64", lambda: empirical_ntk(model, x, dtype=torch.float64)),
        ("tutorial fp32", lambda: entk.tutorial_ntk(model, x, x)),
        ("reference fp32", lambda: reference_ntk(model, x, dtype=torch.float32)),
    ]
    for name, fn in rows:
        try:
            print(f"real n=300 {name}: {err(fn(), ref)}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"real n=300 {name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    with gemm_convolutions(False):
        print("real n=300 engine, cuDNN + zero-patch correction:", err(empirical_ntk(model, x), ref), flush=True)
    with torch.backends.cudnn.flags(enabled=False):
        print("real n=300 engine, cuDNN off:", err(empirical_ntk(model, x), ref), flush=True)
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, benchmark=False):
        print("real n=300 engine, cuDNN deterministic:", err(empirical_ntk(model, x), ref), flush=True)
    k_tr, k_te = empirical_ntk_train_test(model, x, xt)
    print("real train_test:", err(k_tr, ref), err(k_te, ref_cross), flush=True)
    print("random n=300 engine:", err(empirical_ntk(model, xr), ref_r), flush=True)
    print("random n=300 tutorial:", err(entk.tutorial_ntk(model, xr, xr), ref_r), flush=True)

    # layer factors: the capture vs plain autograd, float32, against float64
    m64 = entk.make_model("vgg", "mnist").to(dev).double()
    trainable = {n for n, _ in model.named_parameters()}

    def captured(m, inp):
        state = {k: v.detach() for k, v in list(m.named_parameters()) + list(m.named_buffers())}
        return st.capture(m, state, st.plan(m, trainable), inp)

    xs = x[:50]
    c32, c64 = captured(model, xs), captured(m64, xs.double())
    outs = {}

    def keep(i: int):
        def hook(module, args, out) -> None:
            out.retain_grad()
            outs[i] = out

        return hook

    hooks = [model.body[i].register_forward_hook(keep(i)) for i in (0, 2, 5, 7)]
    model(xs.clone().requires_grad_(True)).sum().backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    for layer, i in enumerate((0, 2, 5, 7)):
        (a32, g32), (a64, g64) = c32[layer], c64[layer]
        manual = outs[i].grad
        print(
            f"layer body.{i}: capture A {err(a32, a64)} G {err(g32, g64)}; plain autograd G {err(manual, g64)}; "
            f"strides capture {tuple(g32.stride())} autograd {tuple(manual.stride())}",
            flush=True,
        )
    # batch 1 vs batch 50 plain autograd per-example gradients
    g1 = torch.autograd.grad(model(xs[:1]).sum(), list(model.parameters()))
    g64 = torch.autograd.grad(m64(xs[:1].double()).sum(), list(m64.parameters()))
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    print("one example's gradient fp32 vs fp64:", err(flat(g1), flat(g64)), flush=True)

    # the full split at a smaller size, to see the size dependence
    for n in sizes:
        xa = xtr[:n]
        k64 = empirical_ntk(model, xa, dtype=torch.float64)
        for on in (True, False, True):  # (the first call of each warms up; times: the later calls)
            with gemm_convolutions(on):
                entk.sync(dev)
                t0 = time.perf_counter()
                k32 = empirical_ntk(model, xa)
                entk.sync(dev)
                seconds = time.perf_counter() - t0
            name = "im2col convolutions" if on else "cuDNN + zero-patch correction"
            print(f"real n={n}: engine fp32 ({name}) vs engine fp64 {err(k32, k64)} ({seconds:.2f} s)", flush=True)
            del k32
        del k64
    last_parts(xtr, xte, dev)


def last_parts(xtr: torch.Tensor, xte: torch.Tensor, dev: str) -> None:
    routes_on_random(dev, 60 if dev == "cpu" else 300)
    factors_or_products(xtr, dev, (300,) if dev == "cpu" else (300, 2000, 6000))
    routes_on_full_split(xtr, xte, dev)


if __name__ == "__main__":
    main()
