"""``report``: read the grid's ``cell.json`` files and write the reproduction report (markdown + PNG figures).

Every number in the report comes from the cell files; the claim verdicts are computed from them by the rules
stated next to each claim (:func:`judge_claims`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_afterkernel.callbacks.rows import INVARIANCE_FAMILIES, KERNEL_LABELS, KERNELS, ResultRow
from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.reporting.grid import (
    ARCHITECTURES,
    AUGMENTATIONS,
    CELL_FILENAME,
    DATASETS,
    PAPER_LR,
    load_complete,
    scale_key,
)

SMALL_TRANSFORMS = ("shift", "rotation", "zoom")
STAGES = ("initial", "few", "end")
LABELS = {
    "vgg": "VGG",
    "mlp": "MLP",
    "mnist": "MNIST",
    "cifar10": "CIFAR-10",
    "noaug": "no augmentation",
    "aug": "augmentation",
}
MUCH_BETTER_RELATIVE = 0.25
"""Claim 1: "much more accurate" = the after-kernel SVM error is at most 75% of the initial one ..."""
MUCH_BETTER_ABSOLUTE = 0.01
"""... and at least 1 percentage point lower."""
CK_CLOSE = 0.02
"""Claim 5: the CK "approximates" the NTK when their SVM test errors differ by at most 2 percentage points."""
SCORE_MARGIN = 0.01
"""Noise floor of an invariance-score change (claims 2, 3, 4 and LR): a score "rises" or "falls" only when the change
exceeds max(0.01, 2 standard errors of the difference); a smaller change is within noise."""
ERROR_MARGIN = 0.005
"""Noise floor of an SVM test-error change (claim LR): half a percentage point, or 2 standard errors if larger."""
VERDICTS = ("agrees", "partly agrees", "disagrees", "inconclusive", "not measured")


# ------------------------------------------------------------------------------------------- loading
def load_runs(root: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Complete cell files under ``root``, grouped by cell name (seeds in order); incomplete ones are ignored.

    Raises :class:`ConfigurationError` when they come from more than one scale: their numbers are not comparable.
    """
    runs: dict[str, list[dict[str, Any]]] = {}
    scales: dict[str, list[Path]] = {}
    for path in sorted(Path(root).glob(f"*/seed*/{CELL_FILENAME}")):
        data = load_complete(path)
        if data is not None:
            runs.setdefault(data["cell"], []).append(data)
            scale = json.dumps([data.get("scale"), scale_key(_get(data, ("config", "scale")) or {})], sort_keys=True)
            scales.setdefault(scale, []).append(path)
    if len(scales) > 1:
        found = "; ".join(
            f"scale {json.loads(key)[0]!r} ({len(paths)} files, e.g. {paths[0]})" for key, paths in scales.items()
        )
        raise ConfigurationError(
            f"the cell files under {root} come from different scales or scale definitions: {found}. A report compares "
            "cells of one scale: put each scale's runs in its own folder (reproduce --out) and report each folder."
        )
    for seeds in runs.values():
        seeds.sort(key=lambda d: d["seed"])
    return runs


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


def _get(data: dict[str, Any], path: Iterable[str]) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def stat(seeds: list[dict[str, Any]], *path: str) -> Stat:
    """The field at ``path`` across seeds (missing, null and failed values dropped, and counted in ``fmt``)."""
    values = [_get(d, path) for d in seeds]
    return Stat([float(v) for v in values if _finite(v)], total=len(seeds))


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
            return f"has no hard margin (soft-margin error {_pct(self.soft[seed])})"
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
        k = _get(d, ("kernels", kernel, stage))
        if not k:
            continue
        if _finite(k.get("svm_test_error")):
            out.hard[d["seed"]] = float(k["svm_test_error"])
        elif k.get("svm_separable") is False and _finite(k.get("svm_soft_test_error")):
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


# ------------------------------------------------------------------------------------------- claims
@dataclass
class Claim:
    key: str
    paper: str
    rule: str
    verdict: str
    evidence: list[str]
    coverage: str = ""  # which parts of the claim were not measured (empty: all were)

    @property
    def verdict_text(self) -> str:
        return f"{self.verdict} ({self.coverage})" if self.coverage else self.verdict


def _invariance_images(scale_cfg: dict[str, Any]) -> str:
    """Whose images a scale's invariance scores are on (cell files from before the choice: training images)."""
    return "test" if scale_key(scale_cfg)["invariance_images"] == "test" else "training"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _pairs() -> list[str]:
    return [f"{d}-{a}" for d in DATASETS for a in ARCHITECTURES]


def _coverage(measured: Iterable[str], expected: list[str], unit: str = "pairs") -> str:
    """Which of the ``expected`` names (``dataset-arch[-variant]``) were not measured, e.g. "1 of 4 pairs measured;
    not run: CIFAR-10, VGG"; empty when all were, or none (the verdict "not measured" says so). A dataset,
    architecture or variant with no measured name is named as a whole."""
    measured = set(measured) & set(expected)
    missing = [e for e in expected if e not in measured]
    if not missing or not measured:
        return ""
    groups, covered = [], set()
    for position in range(len(expected[0].split("-"))):
        for part in dict.fromkeys(e.split("-")[position] for e in expected):
            names = {e for e in expected if e.split("-")[position] == part}
            if names <= set(missing) and not names <= covered:
                groups.append(LABELS.get(part, part))
                covered |= names
    rest = [m for m in missing if m not in covered]
    return f"{len(measured)} of {len(expected)} {unit} measured; not run: {', '.join(groups + rest)}"


def _verdict(hits: int, contrary: int, total: int) -> str:
    """All units agree / some do / none do and some go the other way / every change within noise."""
    if total == 0:
        return "not measured"
    if hits == total:
        return "agrees"
    if hits > 0:
        return "partly agrees"
    return "disagrees" if contrary > 0 else "inconclusive"


def _both_parts(*verdicts: str) -> str:
    """The verdict on a claim of several parts from each part's: agrees if every measured part agrees, partly if
    some part agrees at least partly, disagrees if none does and some goes the other way."""
    measured = [v for v in verdicts if v != "not measured"]
    if not measured:
        return "not measured"
    if all(v == "agrees" for v in measured):
        return "agrees"
    if any(v in ("agrees", "partly agrees") for v in measured):
        return "partly agrees"
    return "disagrees" if "disagrees" in measured else "inconclusive"


def _base_cells(runs: dict[str, list[dict[str, Any]]], aug: str = "noaug") -> list[tuple[str, str, str]]:
    return [(d, a, f"{d}-{a}-{aug}") for d in DATASETS for a in ARCHITECTURES if f"{d}-{a}-{aug}" in runs]


def _lr_cells(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """(large-lr cell, its lr 0.01 reference) pairs present in ``runs``."""
    pairs = []
    for name, seeds in sorted(runs.items()):
        cfg = seeds[0]["config"]
        ref = f"{cfg['dataset']}-{cfg['arch']}-noaug"
        if cfg["lr"] != PAPER_LR and ref in runs:
            pairs.append((name, ref))
    return pairs


def _pair_name(seeds: list[dict[str, Any]]) -> str:
    cfg = seeds[0]["config"]
    return f"{cfg['dataset']}-{cfg['arch']}"


def _direction_word(sign: int, up: str, down: str) -> str:
    return up if sign > 0 else (down if sign < 0 else "within noise")


def claim_after_kernel_accuracy(runs: dict[str, list[dict[str, Any]]]) -> Claim:
    evidence, hits, total, measured = [], 0, 0, []
    for _, _, name in _base_cells(runs):
        p = paired(svm_errors(runs[name], "ntk", "initial"), svm_errors(runs[name], "ntk", "few"), ("initial", "few"))
        if p is None:
            continue
        total += 1
        measured.append(_pair_name(runs[name]))
        init, few = p.a, p.b
        much = few.mean <= (1 - MUCH_BETTER_RELATIVE) * init.mean and init.mean - few.mean >= MUCH_BETTER_ABSOLUTE
        hits += much
        soft = " (soft margin)" if "soft" in p.kinds else ""
        evidence.append(
            f"{name}: NTK SVM error {init.fmt(100, 1)}% initial -> {few.fmt(100, 1)}% after a few epochs{soft}"
            f" ({'much better' if much else 'not much better'}{p.note()})"
        )
    return Claim(
        "1",
        "After a few epochs, for some dataset-architecture pairs, the after-kernel SVM is much more accurate than "
        "the initial-kernel SVM.",
        f"agrees if for at least one pair (no augmentation, lr 0.01) the mean after-kernel error is <= "
        f"{1 - MUCH_BETTER_RELATIVE:.0%} of the initial one and at least {100 * MUCH_BETTER_ABSOLUTE:.0f} "
        "percentage point lower.",
        "agrees" if hits else ("disagrees" if total else "not measured"),
        evidence,
        _coverage(measured, _pairs()),
    )


def claim_globalness(runs: dict[str, list[dict[str, Any]]]) -> Claim:
    evidence, hits, contrary, total, measured = [], 0, 0, 0, []
    for _, arch, name in _base_cells(runs):
        init = stat(runs[name], "kernels", "ntk", "initial", "invariance", "globalness")
        end = stat(runs[name], "kernels", "ntk", "end", "invariance", "globalness")
        if init.mean is None or end.mean is None:
            continue
        total += 1
        measured.append(_pair_name(runs[name]))
        # lower similarity between x and its quadrant swap = the kernel sees the global layout = more global
        sign = change(init, end, SCORE_MARGIN)
        expected = -1 if arch == "vgg" else 1
        hits += sign == expected
        contrary += sign == -expected
        evidence.append(
            f"{name}: quadrant-swap similarity {init.fmt()} initial -> {end.fmt()} after "
            f"({_direction_word(sign, 'less global', 'more global')}; paper: "
            f"{'more' if arch == 'vgg' else 'less'} global)"
        )
    return Claim(
        "2",
        "The VGG after kernel is more global than the initial kernel (less invariant to swapping image quadrants); "
        "the fully connected one is less global.",
        "globalness score = mean kernel-space cosine between x and its quadrant-swapped version; agrees if the "
        "after-kernel score is lower than the initial one for every VGG pair and higher for every MLP pair (no "
        f"augmentation, NTK), by more than max({SCORE_MARGIN}, 2 standard errors); partly if for some; a smaller "
        "change is within noise. Here: "
        f"{hits} of {total} as the paper says, {contrary} the other way.",
        _verdict(hits, contrary, total),
        evidence,
        _coverage(measured, _pairs()),
    )


def claim_small_invariances(runs: dict[str, list[dict[str, Any]]]) -> Claim:
    evidence, hits, contrary, total, measured = [], 0, 0, 0, []
    for aug in AUGMENTATIONS:
        for _, _, name in _base_cells(runs, aug):
            parts = []
            for fam in SMALL_TRANSFORMS:
                init = stat(runs[name], "kernels", "ntk", "initial", "invariance", fam)
                end = stat(runs[name], "kernels", "ntk", "end", "invariance", fam)
                if init.mean is None or end.mean is None:
                    continue
                total += 1
                sign = change(init, end, SCORE_MARGIN)
                hits += sign > 0
                contrary += sign < 0
                suffix = {1: "", 0: " (within noise)", -1: " (lower)"}[sign]
                parts.append(f"{fam} {init.fmt()} -> {end.fmt()}{suffix}")
            if parts:
                measured.append(name)
                evidence.append(f"{name}: " + "; ".join(parts))
    return Claim(
        "3",
        "The after kernel is more invariant to small shifts, rotations and zooms than the initial kernel.",
        "agrees if the after-kernel (end of training) NTK score exceeds the initial one by more than "
        f"max({SCORE_MARGIN}, 2 standard errors) in every cell and family; partly if in some. Here: {hits} of {total} "
        f"higher, {contrary} lower, {total - hits - contrary} within noise.",
        _verdict(hits, contrary, total),
        evidence,
        _coverage(measured, [f"{p}-{g}" for g in AUGMENTATIONS for p in _pairs()], "cells"),
    )


def claim_augmentation(runs: dict[str, list[dict[str, Any]]]) -> Claim:
    evidence, improved, total, measured = [], 0, 0, []
    for dataset in DATASETS:
        for arch in ARCHITECTURES:
            plain, aug = f"{dataset}-{arch}-noaug", f"{dataset}-{arch}-aug"
            if plain not in runs or aug not in runs:
                continue
            parts = []
            for fam in SMALL_TRANSFORMS:
                a = stat(runs[aug], "kernels", "ntk", "end", "invariance", fam)
                p = stat(runs[plain], "kernels", "ntk", "end", "invariance", fam)
                if a.mean is None or p.mean is None:
                    continue
                total += 1
                up = change(p, a, SCORE_MARGIN) > 0
                improved += up
                parts.append(f"{fam} {p.fmt()} -> {a.fmt()}{' (improved)' if up else ''}")
            if parts:
                measured.append(f"{dataset}-{arch}")
                evidence.append(f"{dataset}-{arch}, no aug -> aug: " + "; ".join(parts))
    verdict = _verdict(total - improved, improved, total)
    return Claim(
        "4",
        "Data augmentation does not improve these invariances of the after kernel.",
        "augmentation 'improves' an invariance when the after-kernel score with augmentation exceeds the one "
        f"without by more than max({SCORE_MARGIN}, 2 standard errors); agrees if no pair and family improves, partly "
        f"if some do. Here: {improved} of {total} improved.",
        verdict,
        evidence,
        _coverage(measured, _pairs()),
    )


def _initial_signature(seeds: list[dict[str, Any]]) -> str:
    """The initial-kernel SVM results of a cell by seed: cells of one dataset-architecture pair share them (same seed,
    initialisation and kernel subsets), so their initial comparisons are one comparison, not several."""
    fields = [(k, f) for k in KERNELS for f in ("svm_test_error", "svm_soft_test_error")]
    return json.dumps([[d["seed"]] + [_get(d, ("kernels", k, "initial", f)) for k, f in fields] for d in seeds])


def claim_ck(runs: dict[str, list[dict[str, Any]]], large_lr: float | None = None) -> Claim:
    evidence, close, total, measured = [], 0, 0, []
    comparisons: list[tuple[str, list[str], str]] = []  # (label, cells, stage)
    by_pair: dict[str, list[str]] = {}
    for name in _ordered(runs):
        by_pair.setdefault(_pair_name(runs[name]), []).append(name)
    for pair, names in by_pair.items():
        shared: dict[str, list[str]] = {}
        for name in names:
            shared.setdefault(_initial_signature(runs[name]), []).append(name)
        for group in shared.values():
            label = f"{pair} (initial, shared by {', '.join(group)})" if len(group) > 1 else f"{group[0]} (initial)"
            comparisons.append((label, group, "initial"))
        comparisons += [(f"{name} (end)", [name], "end") for name in names]
    for label, names, stage in comparisons:
        seeds = runs[names[0]]
        p = paired(svm_errors(seeds, "ntk", stage), svm_errors(seeds, "ck", stage), ("NTK", "CK"))
        if p is None:
            continue
        total += 1
        measured.extend(names)
        ntk, ck = p.a, p.b
        near = abs(ck.mean - ntk.mean) <= CK_CLOSE
        close += near
        align = stat([d for d in seeds if d["seed"] in p.seeds], "alignment_ntk_ck", stage)
        evidence.append(
            f"{label}: SVM error NTK {_pct(ntk.mean)}{p.marks[0]}, CK {_pct(ck.mean)}{p.marks[1]}"
            f", NTK-CK alignment {align.fmt()} ({'close' if near else 'not close'}{p.note()})"
        )
    verdict = "not measured" if total == 0 else ("agrees" if 0 < close < total else "disagrees")
    expected = [f"{p}-{g}" for p in _pairs() for g in AUGMENTATIONS]
    if large_lr is not None:
        expected += [f"{p}-lr{large_lr:g}" for p in _pairs()]
    return Claim(
        "5",
        "The conjugate kernel sometimes, but not always, approximates the NTK and the after kernel.",
        f"the CK 'approximates' the NTK when their SVM test errors differ by <= {100 * CK_CLOSE:.0f} points (each "
        "kernel's hard-margin errors over the seeds where it has a hard margin, its soft-margin errors where it has "
        "none in any seed, compared over the seeds both have); agrees if that holds for some but not all distinct "
        "comparisons: the end of every cell, and the initial kernel once per dataset-architecture pair (its cells "
        f"share it). Here: {close} of {total}.",
        verdict,
        evidence,
        _coverage(measured, expected, "cells"),
    )


def claim_learning_rate(runs: dict[str, list[dict[str, Any]]]) -> Claim:
    evidence, better, worse, inv_up, inv_down, total, inv_total, measured = [], 0, 0, 0, 0, 0, 0, []
    mixed = 0  # pairs whose errors are of different kinds (hard vs soft margin): not compared
    for name, ref in _lr_cells(runs):
        big_all, small_all = svm_errors(runs[name], "ntk", "end"), svm_errors(runs[ref], "ntk", "end")
        p = paired(small_all, big_all, (f"lr {PAPER_LR}", "large lr"))
        if p is None:
            continue
        total += 1
        measured.append(_pair_name(runs[name]))
        small, big = p.a, p.b
        comparable = p.kinds[0] == p.kinds[1]
        sign = change(small, big, ERROR_MARGIN) if comparable else 0
        mixed += not comparable
        better += sign < 0
        worse += sign > 0
        word = _direction_word(sign, "higher", "lower") if comparable else "not compared: hard vs soft margin"
        parts = []
        for fam in SMALL_TRANSFORMS:
            b = stat(runs[name], "kernels", "ntk", "end", "invariance", fam)
            s = stat(runs[ref], "kernels", "ntk", "end", "invariance", fam)
            if b.mean is not None and s.mean is not None:
                inv_total += 1
                inv_sign = change(s, b, SCORE_MARGIN)
                inv_up += inv_sign > 0
                inv_down += inv_sign < 0
                parts.append(f"{fam} {s.fmt()} vs {b.fmt()}")
        lr = runs[name][0]["config"]["lr"]
        loss_s = stat(runs[ref], "final_train_loss")
        loss_b = stat(runs[name], "final_train_loss")
        epochs = stat(runs[name], "epochs_trained")
        reached = sum(bool(d.get("reached_target_loss")) for d in runs[name])
        evidence.append(
            f"{ref} (lr {PAPER_LR}) vs {name} (lr {lr:g}): after-kernel SVM error "
            f"{small.fmt(100, 1)}%{p.marks[0]} vs {big.fmt(100, 1)}%{p.marks[1]} ({word}{p.note()})"
            f"; final train loss {loss_s.fmt(1, 4)} vs {loss_b.fmt(1, 4)} after {epochs.fmt(1, 1)} epochs "
            f"(target reached in {reached}/{len(runs[name])} seeds); invariances " + "; ".join(parts)
        )
    return Claim(
        "LR",
        "Training with a larger learning rate (to the same training loss) gives a better after kernel (lower SVM "
        "test error), more invariant to small shifts, rotations and zooms.",
        "two parts, each judged like the other claims: the large-lr after-kernel SVM error is lower than the lr 0.01 "
        f"one by more than max({100 * ERROR_MARGIN:g} points, 2 standard errors) for every dataset-architecture pair "
        "(a pair whose two errors are of different kinds, hard vs soft margin, is not compared), and its shift, "
        f"rotation and zoom invariances are higher by more than max({SCORE_MARGIN}, 2 standard errors); agrees if "
        "every measured part holds everywhere, partly if one holds somewhere, disagrees if neither does and some "
        f"change goes the other way. Here: {better} "
        f"of {total} lower, {worse} higher, {total - better - worse - mixed} within noise"
        + (f", {mixed} not compared" if mixed else "")
        + "; invariance "
        f"higher in {inv_up} of {inv_total}, lower in {inv_down} (beyond max({SCORE_MARGIN}, 2 standard errors)).",
        _both_parts(_verdict(better, worse, total), _verdict(inv_up, inv_down, inv_total)),
        evidence,
        _coverage(measured, _pairs()),
    )


def _large_lr(runs: dict[str, list[dict[str, Any]]]) -> float | None:
    scale = _get(next(iter(runs.values()))[0], ("config", "scale")) if runs else None
    return scale.get("large_lr") if isinstance(scale, dict) else None


def judge_claims(runs: dict[str, list[dict[str, Any]]]) -> list[Claim]:
    """The paper's five claims and the learning-rate claim, each judged from the cell files."""
    return [
        claim_after_kernel_accuracy(runs),
        claim_globalness(runs),
        claim_small_invariances(runs),
        claim_augmentation(runs),
        claim_ck(runs, _large_lr(runs)),
        claim_learning_rate(runs),
    ]


# ------------------------------------------------------------------------------------------- tables
def _svm_cell(seeds: list[dict[str, Any]], kernel: str, stage: str) -> str:
    return svm_errors(seeds, kernel, stage).fmt()


def _ordered(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    order = [f"{d}-{a}-{g}" for d in DATASETS for a in ARCHITECTURES for g in AUGMENTATIONS]
    lr = [n for n, _ in sorted(_lr_cells(runs), key=lambda p: order.index(p[1]))]
    return [n for n in order if n in runs] + lr + sorted(n for n in runs if n not in order and n not in lr)


def error_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| cell | seeds | network itself | NTK initial | NTK after few epochs | NTK end (after kernel) | CK initial "
        "| CK end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in _ordered(runs):
        s = runs[name]
        lines.append(
            f"| {name} | {len(s)} | {stat(s, 'network_test_error').fmt(100, 1)} | {_svm_cell(s, 'ntk', 'initial')} | "
            f"{_svm_cell(s, 'ntk', 'few')} | {_svm_cell(s, 'ntk', 'end')} | {_svm_cell(s, 'ck', 'initial')} | "
            f"{_svm_cell(s, 'ck', 'end')} |"
        )
    return lines


def failures(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per failed SVM evaluation (cell, seed, kernel, stage and the error)."""
    lines = []
    for name in _ordered(runs):
        for kernel in KERNELS:
            for stage in STAGES:
                for seed, message in svm_errors(runs[name], kernel, stage).failed.items():
                    lines.append(f"- {name} seed {seed}, {KERNEL_LABELS[kernel]} {stage}: {message}")
    return lines


def invariance_table(runs: dict[str, list[dict[str, Any]]], kernel: str) -> list[str]:
    head = " | ".join(f"{f} initial | {f} end" for f in INVARIANCE_FAMILIES)
    lines = [f"| cell | {head} |", "|---|" + "---|" * (2 * len(INVARIANCE_FAMILIES))]
    for name in _ordered(runs):
        s = runs[name]
        vals = []
        for fam in INVARIANCE_FAMILIES:
            for stage in ("initial", "end"):
                vals.append(stat(s, "kernels", kernel, stage, "invariance", fam).fmt())
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return lines


def _run_time(seeds: list[dict[str, Any]]) -> str:
    """Mean wall time of the runs; a lower bound ("≥") where an older cell file counted only its last attempt."""
    partial = any(_get(d, ("timings", "resumed")) and "attempts" not in d["timings"] for d in seeds)
    return ("≥ " if partial else "") + stat(seeds, "timings", "total_s").fmt(1, 0)


def kernel_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| cell | NTK-CK alignment initial | NTK-CK alignment end | NTK eff. rank initial | NTK eff. rank end | "
        "NTK alignment end-to-initial | epochs | run time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in _ordered(runs):
        s = runs[name]
        lines.append(
            f"| {name} | {stat(s, 'alignment_ntk_ck', 'initial').fmt()} | {stat(s, 'alignment_ntk_ck', 'end').fmt()} | "
            f"{stat(s, 'kernels', 'ntk', 'initial', 'effective_rank').fmt(1, 2)} | "
            f"{stat(s, 'kernels', 'ntk', 'end', 'effective_rank').fmt(1, 2)} | "
            f"{stat(s, 'kernels', 'ntk', 'end', 'alignment_to_initial').fmt()} | "
            f"{stat(s, 'epochs_trained').fmt(1, 1)} | {_run_time(s)} |"
        )
    return lines


def lr_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| cell | lr | epochs | final train loss | target loss | network | NTK SVM end | shift end | rotation end | "
        "zoom end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ref in _lr_cells(runs):
        for cell in (ref, name):
            s = runs[cell]
            inv = [stat(s, "kernels", "ntk", "end", "invariance", f).fmt() for f in SMALL_TRANSFORMS]
            lines.append(
                f"| {cell} | {s[0]['config']['lr']:g} | {stat(s, 'epochs_trained').fmt(1, 1)} | "
                f"{stat(s, 'final_train_loss').fmt(1, 4)} | {stat(s, 'config', 'target_train_loss').fmt(1, 4)} | "
                f"{stat(s, 'network_test_error').fmt(100, 1)} | {_svm_cell(s, 'ntk', 'end')} | "
                + " | ".join(inv)
                + " |"
            )
    return lines


# ------------------------------------------------------------------------------------------- figures
def draw_figures(runs: dict[str, list[dict[str, Any]]], figures_dir: Path) -> list[Path]:
    """``reproduction_svm_error.png`` and ``reproduction_invariance.png`` (NTK initial vs after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir.mkdir(parents=True, exist_ok=True)
    names = _ordered(runs)
    paths = []

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4))
    width = 0.27
    for i, stage in enumerate(STAGES):
        stats = [Stat(list(svm_errors(runs[n], "ntk", stage).hard.values())) for n in names]
        ax.bar(
            [j + (i - 1) * width for j in range(len(names))],
            [100 * (s.mean if s.mean is not None else math.nan) for s in stats],
            width,
            yerr=[100 * (s.se or 0.0) for s in stats],
            label={"initial": "initial kernel", "few": "after a few epochs", "end": "after kernel (end)"}[stage],
        )
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("hard-margin SVM test error (%)")
    ax.set_title("NTK SVM test error: initial vs after kernel")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(figures_dir / "reproduction_svm_error.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(
        1, len(INVARIANCE_FAMILIES), figsize=(4 * len(INVARIANCE_FAMILIES), 4), sharex=True, sharey=True
    )
    colours = plt.get_cmap("tab20").colors
    for ax, fam in zip(axes, INVARIANCE_FAMILIES, strict=True):
        for i, name in enumerate(names):
            init = stat(runs[name], "kernels", "ntk", "initial", "invariance", fam)
            end = stat(runs[name], "kernels", "ntk", "end", "invariance", fam)
            if init.mean is None or end.mean is None:
                continue
            marker = "s" if "-vgg-" in name else "o"
            ax.errorbar(
                init.mean,
                end.mean,
                xerr=init.se or 0.0,
                yerr=end.se or 0.0,
                fmt=marker,
                color=colours[i % len(colours)],
                label=name,
            )
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_title(fam)
        ax.set_xlabel("initial kernel")
    axes[0].set_ylabel("after kernel (end)")
    axes[0].set_xlim(0, 1)
    axes[0].set_ylim(0, 1)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=7)
    fig.suptitle("NTK invariance scores (cosine of x and T x): above the diagonal = more invariant after training")
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    paths.append(figures_dir / "reproduction_invariance.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------- markdown
def render(runs: dict[str, list[dict[str, Any]]], figure_paths: list[Path], md_dir: Path, source: str) -> str:
    """The markdown report of ``runs`` (all of one scale: :func:`load_runs` checks)."""
    (scale,) = {d["scale"] for seeds in runs.values() for d in seeds}
    scale_cfg = next(iter(runs.values()))[0]["config"]["scale"]
    devices = sorted({str(d["config"].get("accelerator")) for seeds in runs.values() for d in seeds})
    claims = judge_claims(runs)
    out = [
        '# Reproduction of "Properties of the After Kernel" (Long, arXiv 2105.10585)',
        "",
        f"Generated by `python -m lightning_afterkernel report {source}` from the {sum(map(len, runs.values()))} "
        f"cell files under `{source}`; do not edit by hand. Scale: **{scale}** "
        f"(train images {scale_cfg['train_subset'] or 'all'}, test images {scale_cfg['test_subset'] or 'all'}, "
        f"kernel SVM on {scale_cfg['n_train']} train / {scale_cfg['n_test']} test images, invariance scores on "
        f"{scale_cfg['n_invariance']} {_invariance_images(scale_cfg)} images, {scale_cfg['max_epochs']} epochs at "
        f"lr {PAPER_LR}, 'a few epochs' = "
        f"{scale_cfg['few_epochs']}). Device: {', '.join(devices)}. Values are mean ± standard error over seeds "
        "(no ± with one seed); [n/N] = over the n of the cell's N seeds that have the value (the others failed or "
        "lack it).",
        "",
        "## Claims",
        "",
        "| # | paper's claim | our verdict |",
        "|---|---|---|",
    ]
    out += [f"| {c.key} | {c.paper} | **{c.verdict}**{f' ({c.coverage})' if c.coverage else ''} |" for c in claims]
    for c in claims:
        out += ["", f"### Claim {c.key}: {c.verdict_text}", "", c.paper, "", f"Rule: {c.rule}", ""]
        out += [f"- {e}" for e in c.evidence] or ["- no cells measured"]
    out += ["", "## SVM test error (%)", ""]
    out += [
        "Network: the trained network on the test images. NTK initial / after few epochs / end: hard-margin SVM on "
        "the empirical NTK (the end one is the after kernel). CK: conjugate kernel. (s) = soft-margin SVM (C = 1) "
        "error of the seeds where no hard margin exists; hard- and soft-margin errors are never averaged together: "
        "where only some seeds have a hard margin, both means are shown, each with its seed count. failed [k/N] = "
        "the evaluation failed in k seeds (listed below the table).",
        "",
    ]
    out += error_table(runs)
    failed = failures(runs)
    if failed:
        out += ["", "Failed evaluations (from the cell files' `error` fields):", "", *failed]
    for kernel in KERNELS:
        out += ["", f"## Invariance scores, {KERNEL_LABELS[kernel]} (mean cosine of x and T x in kernel space)", ""]
        out += invariance_table(runs, kernel)
    out += ["", "## Kernel structure and cost", ""]
    out += [
        "Run time: wall time of a run (training, kernels, SVMs, invariance scores), summed over its attempts when an "
        "interrupted run was resumed.",
        "",
    ]
    out += kernel_table(runs)
    out += ["", "## Learning-rate study", ""]
    out += [
        "The larger-lr run trains until its epoch-mean training loss is <= the final one of the lr 0.01 run with the "
        "same seed (its 'target loss'), or until its epoch cap.",
        "",
    ]
    out += lr_table(runs) if _lr_cells(runs) else ["No learning-rate cells measured."]
    out += ["", "## Figures", ""]
    out += [
        "The SVM-error figure shows the NTK's hard-margin errors (means over the seeds that have a hard margin).",
        "",
    ]
    for path in figure_paths:
        rel = path.relative_to(md_dir) if path.is_relative_to(md_dir) else path
        out += [f"![{path.stem}]({rel.as_posix()})", ""]
    return "\n".join(out).rstrip() + "\n"


def write_report(
    root: str | Path, out: str | Path = "docs/reproduction.md", figures_dir: str | Path | None = None
) -> Path:
    """Write the markdown report (and its figures) for the cell files under ``root``; returns its path."""
    runs = load_runs(root)
    if not runs:
        raise ConfigurationError(
            f"no complete {CELL_FILENAME} files under {root}; run `python -m lightning_afterkernel reproduce "
            f"--out {root}` first."
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig_dir = Path(figures_dir) if figures_dir is not None else out.parent / "figures"
    paths = draw_figures(runs, fig_dir)
    out.write_text(render(runs, paths, out.parent, str(root)))
    return out
