"""The paper's claims, each judged from one scale's cell files by the rule stated next to it (:func:`judge_claims`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lightning_afterkernel.callbacks.rows import KERNELS
from lightning_afterkernel.reporting.grid import ARCHITECTURES, AUGMENTATIONS, DATASETS, PAPER_LR
from lightning_afterkernel.reporting.stats import change, get_path, paired, pct, stat, svm_errors

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
CLAIM_VARIANTS: dict[str, tuple[str, ...]] = {
    "1": ("noaug",),
    "2": ("noaug",),
    "3": ("noaug", "aug"),
    "4": ("noaug", "aug"),
    "5": ("noaug", "aug", "lr"),
    "LR": ("noaug", "lr"),
}
"""The cells each claim is judged from, by variant (``noaug``, ``aug``, ``lr``: the learning-rate study's), in every
dataset-architecture pair: a claim's verdict is final once all of them are complete."""


@dataclass
class Claim:
    key: str
    paper: str
    criterion: str  # the rule, the same at every scale
    verdict: str
    evidence: list[str]
    coverage: str = ""  # which parts of the claim were not measured (empty: all were)
    tally: str = ""  # what the rule counted in these cell files

    @property
    def rule(self) -> str:
        """The criterion and, after "Here:", what it counted."""
        return f"{self.criterion} Here: {self.tally}" if self.tally else self.criterion

    @property
    def verdict_text(self) -> str:
        return f"{self.verdict} ({self.coverage})" if self.coverage else self.verdict


def variant(cell: str) -> str:
    """``noaug``, ``aug`` or ``lr``: which part of the grid a cell name belongs to."""
    last = cell.rsplit("-", 1)[-1]
    return last if last in AUGMENTATIONS else "lr"


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


def lr_cells(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
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
        f"{hits} of {total} much better.",
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
        "change is within noise.",
        _verdict(hits, contrary, total),
        evidence,
        _coverage(measured, _pairs()),
        f"{hits} of {total} as the paper says, {contrary} the other way.",
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
        f"max({SCORE_MARGIN}, 2 standard errors) in every cell and family; partly if in some.",
        _verdict(hits, contrary, total),
        evidence,
        _coverage(measured, [f"{p}-{g}" for g in AUGMENTATIONS for p in _pairs()], "cells"),
        f"{hits} of {total} higher, {contrary} lower, {total - hits - contrary} within noise.",
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
        "if some do.",
        verdict,
        evidence,
        _coverage(measured, _pairs()),
        f"{improved} of {total} improved.",
    )


def _initial_signature(seeds: list[dict[str, Any]]) -> str:
    """The initial-kernel SVM results of a cell by seed: cells of one dataset-architecture pair share them (same seed,
    initialisation and kernel subsets), so their initial comparisons are one comparison, not several."""
    fields = [(k, f) for k in KERNELS for f in ("svm_test_error", "svm_soft_test_error")]
    return json.dumps([[d["seed"]] + [get_path(d, ("kernels", k, "initial", f)) for k, f in fields] for d in seeds])


def claim_ck(runs: dict[str, list[dict[str, Any]]], large_lr: float | None = None) -> Claim:
    evidence, close, total, measured = [], 0, 0, []
    comparisons: list[tuple[str, list[str], str]] = []  # (label, cells, stage)
    by_pair: dict[str, list[str]] = {}
    for name in ordered_cells(runs):
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
            f"{label}: SVM error NTK {pct(ntk.mean)}{p.marks[0]}, CK {pct(ck.mean)}{p.marks[1]}"
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
        "share it).",
        verdict,
        evidence,
        _coverage(measured, expected, "cells"),
        f"{close} of {total}.",
    )


def claim_learning_rate(runs: dict[str, list[dict[str, Any]]]) -> Claim:
    evidence, better, worse, inv_up, inv_down, total, inv_total, measured = [], 0, 0, 0, 0, 0, 0, []
    mixed = 0  # pairs whose errors are of different kinds (hard vs soft margin): not compared
    for name, ref in lr_cells(runs):
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
        "change goes the other way.",
        _both_parts(_verdict(better, worse, total), _verdict(inv_up, inv_down, inv_total)),
        evidence,
        _coverage(measured, _pairs()),
        f"{better} of {total} lower, {worse} higher, {total - better - worse - mixed} within noise"
        + (f", {mixed} not compared" if mixed else "")
        + f"; invariance higher in {inv_up} of {inv_total}, lower in {inv_down} (beyond max({SCORE_MARGIN}, 2 "
        "standard errors)).",
    )


def _large_lr(runs: dict[str, list[dict[str, Any]]]) -> float | None:
    scale = get_path(next(iter(runs.values()))[0], ("config", "scale")) if runs else None
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


def ordered_cells(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The cell names of ``runs`` in report order: by pair and augmentation, then the learning-rate cells."""
    order = [f"{d}-{a}-{g}" for d in DATASETS for a in ARCHITECTURES for g in AUGMENTATIONS]
    lr = [n for n, _ in sorted(lr_cells(runs), key=lambda p: order.index(p[1]))]
    return [n for n in order if n in runs] + lr + sorted(n for n in runs if n not in order and n not in lr)
