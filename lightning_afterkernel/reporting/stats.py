"""Statistics of the grid's cell files across seeds: means and standard errors, the SVM test errors of a kernel
(hard- and soft-margin errors kept apart, failures kept visible), paired comparisons and the noise rule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lightning_afterkernel.callbacks.rows import ResultRow


@dataclass
class Stat:
    """Mean and standard error over seeds (``se`` is None for one seed).

    ``total`` is the number of seeds asked about; when only some of them have a value, :meth:`fmt` says so.
    """

    values: list[float] = field(default_factory=list)
    total: int | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.values else None

    @property
    def se(self) -> float | None:
        if self.n < 2:
            return None
        m = self.mean
        var = sum((v - m) ** 2 for v in self.values) / (self.n - 1)
        return math.sqrt(var / self.n)

    def fmt(self, scale: float = 1.0, digits: int = 3, label: str = "") -> str:
        """``mean ± se``, then ``label``, then `` [n/N]`` when only n of the N seeds have a value."""
        if self.mean is None:
            return "n/a"
        text = f"{self.mean * scale:.{digits}f}"
        if self.se is not None:
            text += f" ± {self.se * scale:.{digits}f}"
        if self.total is not None and self.n < self.total:
            label += f" [{self.n}/{self.total}]"
        return text + label


def get_path(data: dict[str, Any], path: Iterable[str]) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def is_finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def stat(seeds: list[dict[str, Any]], *path: str) -> Stat:
    """The field at ``path`` across seeds (missing, null and failed values dropped, and counted in ``fmt``)."""
    values = [get_path(d, path) for d in seeds]
    return Stat([float(v) for v in values if is_finite(v)], total=len(seeds))


@dataclass
class SvmErrors:
    """One kernel at one stage across seeds, by seed: hard-margin test errors, soft-margin ones (where no hard margin
    exists) and failed evaluations (their error messages). Hard and soft errors are never averaged together."""

    hard: dict[int, float]
    soft: dict[int, float]
    failed: dict[int, str]
    total: int

    @property
    def kind(self) -> str | None:
        """The errors a comparison uses: ``hard`` where any seed has a hard margin, else ``soft``; None if none."""
        return "hard" if self.hard else ("soft" if self.soft else None)

    def values(self) -> dict[int, float]:
        """The errors of :attr:`kind` by seed."""
        return self.hard if self.kind == "hard" else self.soft

    def seeds(self) -> set[int]:
        return set(self.hard) | set(self.soft) | set(self.failed)

    def why_not(self, seed: int) -> str:
        """Why ``seed`` has no error of :attr:`kind` (where ``kind`` is ``hard``: no hard margin, or a failure)."""
        if seed in self.failed:
            return f"failed ({self.failed[seed]})"
        if seed in self.soft:
            return f"has no hard margin (soft-margin error {pct(self.soft[seed])})"
        return "was not evaluated"

    def fmt(self) -> str:
        """Hard-margin mean; soft-margin mean marked (s); failures; each with [n/N] when not every seed has it."""
        parts = []
        if self.hard:
            parts.append(Stat(list(self.hard.values()), self.total).fmt(100, 1))
        if self.soft:
            parts.append(Stat(list(self.soft.values()), self.total).fmt(100, 1, " (s)"))
        if self.failed:
            parts.append(f"failed [{len(self.failed)}/{self.total}]")
        return "; ".join(parts) or "n/a"


def _failure(d: dict[str, Any], kernel: str, summary: dict[str, Any]) -> str:
    """Why a kernel summary has no SVM error: its ``error`` (or, in older cell files, its row's), else a fallback."""
    if summary.get("error"):
        return str(summary["error"])
    for row in map(ResultRow.from_dict, d.get("rows") or []):
        if row.kernel == kernel and row.epoch == summary.get("epoch") and row.error:
            return row.error
    if summary.get("svm_separable") is False:
        return "no hard margin and no soft-margin result"
    return "no SVM result"


def svm_errors(seeds: list[dict[str, Any]], kernel: str, stage: str) -> SvmErrors:
    """The SVM test errors of ``kernel`` at ``stage`` across seeds (seeds without that stage are left out)."""
    out = SvmErrors({}, {}, {}, len(seeds))
    for d in seeds:
        k = get_path(d, ("kernels", kernel, stage))
        if not k:
            continue
        if is_finite(k.get("svm_test_error")):
            out.hard[d["seed"]] = float(k["svm_test_error"])
        elif k.get("svm_separable") is False and is_finite(k.get("svm_soft_test_error")):
            out.soft[d["seed"]] = float(k["svm_soft_test_error"])
        else:
            out.failed[d["seed"]] = _failure(d, kernel, k)
    return out


@dataclass
class Paired:
    """Two SVM errors compared over the seeds where both have a value of the kind each is compared by."""

    a: Stat
    b: Stat
    kinds: tuple[str, str]
    seeds: list[int]
    left_out: dict[int, str]  # seed -> why it is not compared

    @property
    def marks(self) -> tuple[str, str]:
        """`` (soft margin)`` after each side compared by soft-margin errors, else ``""``."""
        a, b = (" (soft margin)" if kind == "soft" else "" for kind in self.kinds)
        return a, b

    def note(self) -> str:
        if not self.left_out:
            return ""
        why = "; ".join(f"seed {s} {r}" for s, r in self.left_out.items())
        return f"; seeds {', '.join(map(str, self.seeds))} only: {why}"


def paired(a: SvmErrors, b: SvmErrors, labels: tuple[str, str]) -> Paired | None:
    """``a`` and ``b`` over the seeds both have, each by its :attr:`SvmErrors.kind`; None if no seed is shared."""
    va, vb = a.values(), b.values()
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return None
    left_out = {
        s: ", ".join(f"{label} {x.why_not(s)}" for x, label in zip((a, b), labels, strict=True) if s not in x.values())
        for s in sorted((a.seeds() | b.seeds()) - set(seeds))
    }
    return Paired(
        Stat([va[s] for s in seeds], len(seeds)),
        Stat([vb[s] for s in seeds], len(seeds)),
        (a.kind, b.kind),
        seeds,
        left_out,
    )


def change(before: Stat, after: Stat, floor: float) -> int:
    """+1 if ``after`` exceeds ``before`` by more than max(floor, 2 standard errors of the difference), -1 if it is
    that much lower, 0 if the change is within noise."""
    diff = after.mean - before.mean
    margin = max(floor, 2 * math.sqrt((before.se or 0.0) ** 2 + (after.se or 0.0) ** 2))
    return 1 if diff > margin else (-1 if diff < -margin else 0)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
