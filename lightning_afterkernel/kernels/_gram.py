"""Kernel tiles from :class:`~lightning_afterkernel.kernels._structured.Factors`, and memory budgets."""

from __future__ import annotations

import os
import re

import torch
from torch import Tensor

from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.kernels._structured import Factors

TILE_TEMP_BYTES = 64 * 2**20
"""Cap on the temporaries of one structured layer's tile with T > 1 positions (b1 T x b2 T matrices)."""
SMALL_PRODUCT = 16
"""A product of materialised factors with fewer rows than this on either side is summed in blocks of
:data:`K_BLOCK` parameters (:func:`_factor_product`)."""
K_BLOCK = 2048
"""Parameters per block in those products."""
CPU_BUDGET_FRACTION = 0.25
GPU_BUDGET_FRACTION = 0.5
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def gram(f1: Factors, f2: Factors, out: Tensor) -> Tensor:
    """Write K(block 1, block 2) into ``out`` (b1, b2): J1 J2^T plus each structured layer's term."""
    if f1.jac is not None:
        _factor_product(f1.jac, f2.jac, out)
    else:
        out.zero_()
    vectors, patches = [], []
    for (l1, r1), (l2, r2) in zip(f1.pairs, f2.pairs, strict=True):
        (vectors if l1.shape[1] == 1 else patches).append((l1, r1, l2, r2))
    for l1, r1, l2, r2 in vectors:
        out.addcmul_(_product(l1[:, 0], l2[:, 0]), _product(r1[:, 0], r2[:, 0]))
    for l1, r1, l2, r2 in patches:
        t = l1.shape[1]
        b1, b2 = len(l1), len(l2)
        step = max(1, TILE_TEMP_BYTES // (2 * b2 * t * t * out.element_size()))
        for start in range(0, b1, step):
            rows = slice(start, start + step)
            b = len(l1[rows])
            left = l1[rows].reshape(b * t, -1) @ l2.reshape(b2 * t, -1).mT
            left.mul_(r1[rows].reshape(b * t, -1) @ r2.reshape(b2 * t, -1).mT)
            out[rows] += left.reshape(b, t, b2, t).sum((1, 3))
    return out


def _product(a: Tensor, b: Tensor) -> Tensor:
    """``a b^T`` in a new tensor, summed as :func:`_factor_product` sums it."""
    out = a.new_empty(len(a), len(b))
    _factor_product(a, b, out)
    return out


def _factor_product(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``out = a b^T``, as accurate for a few rows on either side as for many.

    On CPU, MKL multiplies thin float32 matrices (fewer than ~12 rows on a side) with one running sum per entry
    over all P parameters: on factors of 95,267 parameters the product was 4e-6 to 4e-5 from float64 where a
    512 x 512 one was 6e-7 (and, in the concurrent strips' 6 x 6 corner of a 12-example kernel, 4e-6). Summing
    blocks of K_BLOCK parameters gave 1e-7 to 7e-7 for every shape (2048; 8192 gave up to 2e-6). Those products
    take 1.02-1.1x the time with the thin side first (a few test examples against many), up to 1.5-1.8x with it
    second (e.g. 2,000 x 8 or 256 x 1: milliseconds). GPUs and float64 keep one product: on an H200 the paper's
    VGG kernel came out as close to float64 with the products summed in blocks of 512 to 16,384 parameters, or
    in float64, as with cuBLAS's one product (its float32 error is in the factors)."""
    block = _k_block(a, b)
    if block is None or a.shape[1] <= block:
        torch.mm(a, b.mT, out=out)
        return
    torch.mm(a[:, :block], b[:, :block].mT, out=out)
    for start in range(block, a.shape[1], block):
        out.addmm_(a[:, start : start + block], b[:, start : start + block].mT)


def _k_block(a: Tensor, b: Tensor) -> int | None:
    """Parameters per block for ``a b^T`` (None: one product)."""
    thin = min(len(a), len(b)) < SMALL_PRODUCT
    return K_BLOCK if thin and a.dtype == torch.float32 and a.device.type == "cpu" else None


def paired(f1: Factors, f2: Factors) -> Tensor:
    """K(x1[i], x2[i]) for the examples of two blocks of equal length: (b,), or (b, s, s) for stacked logits."""
    if f1.stacked:
        return _paired_blocks(f1, f2)
    out = (f1.jac * f2.jac).sum(1) if f1.jac is not None else f1.pairs[0][0].new_zeros(len(f1))
    for (l1, r1), (l2, r2) in zip(f1.pairs, f2.pairs, strict=True):
        if l1.shape[1] == 1:
            out += (l1[:, 0] * l2[:, 0]).sum(1) * (r1[:, 0] * r2[:, 0]).sum(1)
        else:
            out += ((l1 @ l2.mT) * (r1 @ r2.mT)).sum((1, 2))
    return out


def _paired_blocks(f1: Factors, f2: Factors) -> Tensor:
    """The (s, s) block K(x1[i], x2[i]) of every pair of the s stacked logits, for each example i."""
    b, s = len(f1), f1.logits
    like = f1.jac if f1.jac is not None else f1.pairs[0][1]
    out = like.new_zeros(b, s, s)
    if f1.jac is not None:
        out += f1.jac.reshape(b, s, -1) @ f2.jac.reshape(b, s, -1).mT
    for (l1, r1), (l2, r2) in zip(f1.pairs, f2.pairs, strict=True):
        left1, left2 = l1.reshape(b, s, *l1.shape[1:])[:, 0], l2.reshape(b, s, *l2.shape[1:])[:, 0]  # (b, T, d)
        right1, right2 = r1.reshape(b, s, *r1.shape[1:]), r2.reshape(b, s, *r2.shape[1:])  # (b, s, T, p)
        if l1.shape[1] == 1:
            out += (left1[:, 0] * left2[:, 0]).sum(1)[:, None, None] * (right1[:, :, 0] @ right2[:, :, 0].mT)
        else:
            out += torch.einsum("ntu,natp,nbup->nab", left1 @ left2.mT, right1, right2)
    return out


def parse_memory_budget(memory_budget: int | float | str | None) -> int | None:
    """Bytes from an int/float or a string such as ``"1GiB"`` or ``"512 MB"``; None stays None."""
    if memory_budget is None:
        return None
    if isinstance(memory_budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?i?[bB]?)\s*", memory_budget)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    elif not isinstance(memory_budget, bool) and isinstance(memory_budget, (int, float)) and memory_budget > 0:
        return int(memory_budget)
    raise ConfigurationError(
        f"memory_budget={memory_budget!r} must be a positive number of bytes or a string such as '1GiB' or "
        "'512MB'; None sizes it from the free memory of the device."
    )


def default_budget(device: torch.device) -> int:
    """A safe share of the free memory: half of the GPU's free memory, a quarter of available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_BUDGET_FRACTION)
    return int(_available_ram() * CPU_BUDGET_FRACTION)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 4 * 2**30
