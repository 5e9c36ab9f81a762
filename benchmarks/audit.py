"""Cost of the capture's audit (``kernels/_audit.py``) beside the kernel it protects, in one run.

For the paper's models (VGG and MLP, MNIST and CIFAR-10 shapes, random pixels in [0, 1]) this times
``empirical_ntk_train_test`` at the callback's default sizes (1,000 train, 500 test) and the symmetric
``empirical_ntk`` at n = 2,000, with the audit and with it switched off, interleaved (median of ``--repeats``),
and prints the audit's share of the kernel time (target: at most 5%).

    python benchmarks/audit.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from lightning_afterkernel.kernels import _audit, empirical, empirical_ntk, empirical_ntk_train_test
from lightning_afterkernel.models import MLPClassifier, VGGClassifier

SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
ARCHS = {"mlp": MLPClassifier, "vgg": VGGClassifier}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(arch: str, data: str, task: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = ARCHS[arch](input_shape=SHAPES[data]).eval()
    generator = torch.Generator().manual_seed(1)
    if task == "train_test":
        x_train = torch.rand(1000, *SHAPES[data], generator=generator)
        x_test = torch.rand(500, *SHAPES[data], generator=generator)

        def run():
            return empirical_ntk_train_test(model, x_train, x_test)
    else:
        x = torch.rand(2000, *SHAPES[data], generator=generator)

        def run():
            return empirical_ntk(model, x)

    audit = empirical.audit_capture
    run()  # warm-up (oneDNN set-up, memory-format choices)
    on, off = [], []
    for _ in range(repeats):
        on.append(_timed(run))
        empirical.audit_capture = lambda *args, **kwargs: None
        try:
            off.append(_timed(run))
        finally:
            empirical.audit_capture = audit
    with_audit, without = statistics.median(on), statistics.median(off)
    return {"with": with_audit, "without": without, "share": with_audit / without - 1}


def audit_alone(arch: str, data: str, repeats: int) -> float:
    """Median seconds of the audit by itself, beyond the float64 probe the engine reads the layers from (what the
    share above should be close to)."""
    from lightning_afterkernel.kernels import _structured as st

    torch.manual_seed(0)
    model = ARCHS[arch](input_shape=SHAPES[data]).eval()
    trainable = {k: v.detach() for k, v in model.named_parameters()}
    fixed = {k: v.detach() for k, v in model.named_buffers()}
    layers = st.plan(model, set(trainable))
    x = torch.rand(_audit.AUDIT_EXAMPLES, *SHAPES[data])
    probe = _audit.probe_capture(model, trainable, fixed, layers, x)  # (the engine's probe: not the audit's cost)
    st.choose_forms(layers, probe.captured[0], 1000**2 / 2, 1000, force=None)
    return statistics.median(
        _timed(lambda: _audit.audit_capture(model, probe, layers)) for _ in range(max(5, repeats))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="MNIST shapes and the train/test task only")
    args = parser.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| model | task | kernel with audit (s) | without (s) | audit share | audit alone (s) |")
    print("|---|---|---|---|---|---|")
    datasets = ["mnist"] if args.quick else list(SHAPES)
    tasks = ["train_test"] if args.quick else ["train_test", "gram_2000"]
    for data in datasets:
        for arch in ARCHS:
            alone = audit_alone(arch, data, args.repeats)
            for task in tasks:
                row = measure(arch, data, task, args.repeats)
                print(
                    f"| {arch} {data} | {task} | {row['with']:.3f} | {row['without']:.3f} | "
                    f"{100 * row['share']:+.1f}% | {alone:.4f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
