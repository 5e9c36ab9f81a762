"""``report``: read the grid's ``cell.json`` files and write the reproduction report (markdown + PNG figures).

Every number in the report comes from the cell files; the claim verdicts are computed from them by the rules
stated next to each claim (:func:`judge_claims`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.reporting.grid import (
    ARCHITECTURES,
    AUGMENTATIONS,
    CELL_FILENAME,
    DATASETS,
    PAPER_LR,
    load_complete,
)

FAMILIES = ("globalness", "shift", "rotation", "zoom")
SMALL_TRANSFORMS = ("shift", "rotation", "zoom")
STAGES = ("initial", "few", "end")
MUCH_BETTER_RELATIVE = 0.25
"""Claim 1: "much more accurate" = the after-kernel SVM error is at most 75% of the initial one ..."""
MUCH_BETTER_ABSOLUTE = 0.01
"""... and at least 1 percentage point lower."""
CK_CLOSE = 0.02
"""Claim 5: the CK "approximates" the NTK when their SVM test errors differ by at most 2 percentage points."""
AUG_MARGIN = 0.01
"""Claim 4: augmentation "improves" an invariance when it raises the after-kernel score by more than
max(0.01, 2 standard errors of the difference)."""
VERDICTS = ("agrees", "partly agrees", "disagrees", "not measured")


# ------------------------------------------------------------------------------------------- loading
def load_runs(root: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Complete cell files under ``root``, grouped by cell name (seeds in order); incomplete ones are ignored."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(root).glob(f"*/seed*/{CELL_FILENAME}")):
        data = load_complete(path)
        if data is not None:
            runs.setdefault(data["cell"], []).append(data)
    for seeds in runs.values():
        seeds.sort(key=lambda d: d["seed"])
    return runs


@dataclass
class Stat:
    """Mean and standard error over seeds (``se`` is None for one seed)."""

    values: list[float] = field(default_factory=list)

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

    def fmt(self, scale: float = 1.0, digits: int = 3) -> str:
        if self.mean is None:
            return "n/a"
        text = f"{self.mean * scale:.{digits}f}"
        return text if self.se is None else f"{text} ± {self.se * scale:.{digits}f}"


def _get(data: dict[str, Any], path: Iterable[str]) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def stat(seeds: list[dict[str, Any]], *path: str) -> Stat:
    """The field at ``path`` across seeds (missing and null values dropped)."""
    values = [_get(d, path) for d in seeds]
    return Stat([float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)])


def svm_error(seeds: list[dict[str, Any]], kernel: str, stage: str) -> tuple[Stat, bool]:
    """Hard-margin SVM test error across seeds, or the soft-margin one where no hard margin exists (flag True)."""
    values, soft = [], False
    for d in seeds:
        k = _get(d, ("kernels", kernel, stage))
        if not k:
            continue
        if k.get("svm_test_error") is not None:
            values.append(float(k["svm_test_error"]))
        elif k.get("svm_soft_test_error") is not None:
            values.append(float(k["svm_soft_test_error"]))
            soft = True
    return Stat(values), soft


# ------------------------------------------------------------------------------------------- claims
@dataclass
class Claim:
    key: str
    paper: str
    rule: str
    verdict: str
    evidence: list[str]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


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


def _verdict(hits: int, total: int) -> str:
    if total == 0:
        return "not measured"
    if hits == total:
        return "agrees"
    return "partly agrees" if hits > 0 else "disagrees"


def claim_after_kernel_accuracy(runs: dict[str, list[dict[str, Any]]]) -> Claim:
    evidence, hits, total = [], 0, 0
    for _, _, name in _base_cells(runs):
        init, _ = svm_error(runs[name], "ntk", "initial")
        few, _ = svm_error(runs[name], "ntk", "few")
        if init.mean is None or few.mean is None:
            continue
        total += 1
        much = few.mean <= (1 - MUCH_BETTER_RELATIVE) * init.mean and init.mean - few.mean >= MUCH_BETTER_ABSOLUTE
        hits += much
        evidence.append(
            f"{name}: NTK SVM error {init.fmt(100, 1)}% initial -> {few.fmt(100, 1)}% after a few epochs"
            f" ({'much better' if much else 'not much better'})"
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
    )


def claim_globalness(runs: dict[str, list[dict[str, Any]]]) -> Claim:
    evidence, hits, total = [], 0, 0
    for _, arch, name in _base_cells(runs):
        init = stat(runs[name], "kernels", "ntk", "initial", "invariance", "globalness")
        end = stat(runs[name], "kernels", "ntk", "end", "invariance", "globalness")
        if init.mean is None or end.mean is None:
            continue
        total += 1
        # lower similarity between x and its quadrant swap = the kernel sees the global layout = more global
        expected = end.mean < init.mean if arch == "vgg" else end.mean > init.mean
        hits += expected
        direction = "more global" if end.mean < init.mean else "less global"
        evidence.append(
            f"{name}: quadrant-swap similarity {init.fmt()} initial -> {end.fmt()} after ({direction}; paper: "
            f"{'more' if arch == 'vgg' else 'less'} global)"
        )
    return Claim(
        "2",
        "The VGG after kernel is more global than the initial kernel (less invariant to swapping image quadrants); "
        "the fully connected one is less global.",
        "globalness score = mean kernel-space cosine between x and its quadrant-swapped version; agrees if the "
        "after-kernel score is lower than the initial one for every VGG pair and higher for every MLP pair "
        "(no augmentation, NTK).",
        _verdict(hits, total),
        evidence,
    )


def claim_small_invariances(runs: dict[str, list[dict[str, Any]]]) -> Claim:
    evidence, hits, total = [], 0, 0
    for aug in AUGMENTATIONS:
        for _, _, name in _base_cells(runs, aug):
            parts = []
            for fam in SMALL_TRANSFORMS:
                init = stat(runs[name], "kernels", "ntk", "initial", "invariance", fam)
                end = stat(runs[name], "kernels", "ntk", "end", "invariance", fam)
                if init.mean is None or end.mean is None:
                    continue
                total += 1
                hits += end.mean > init.mean
                parts.append(f"{fam} {init.fmt()} -> {end.fmt()}")
            if parts:
                evidence.append(f"{name}: " + "; ".join(parts))
    verdict = _verdict(hits, total)
    return Claim(
        "3",
        "The after kernel is more invariant to small shifts, rotations and zooms than the initial kernel.",
        "agrees if the after-kernel (end of training) NTK score exceeds the initial one in every cell and family; "
        f"partly if in some. Here: {hits} of {total}.",
        verdict,
        evidence,
    )


def claim_augmentation(runs: dict[str, list[dict[str, Any]]]) -> Claim:
    evidence, improved, total = [], 0, 0
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
                se = math.sqrt((a.se or 0.0) ** 2 + (p.se or 0.0) ** 2)
                up = a.mean - p.mean > max(AUG_MARGIN, 2 * se)
                improved += up
                parts.append(f"{fam} {p.fmt()} -> {a.fmt()}{' (improved)' if up else ''}")
            if parts:
                evidence.append(f"{dataset}-{arch}, no aug -> aug: " + "; ".join(parts))
    verdict = "not measured" if total == 0 else ("agrees" if improved == 0 else _verdict(total - improved, total))
    return Claim(
        "4",
        "Data augmentation does not improve these invariances of the after kernel.",
        "augmentation 'improves' an invariance when the after-kernel score with augmentation exceeds the one "
        f"without by more than max({AUG_MARGIN}, 2 standard errors); agrees if no pair and family improves, partly "
        f"if some do. Here: {improved} of {total} improved.",
        verdict,
        evidence,
    )


def claim_ck(runs: dict[str, list[dict[str, Any]]]) -> Claim:
    evidence, close, total = [], 0, 0
    for name in sorted(runs):
        for stage in ("initial", "end"):
            ntk, _ = svm_error(runs[name], "ntk", stage)
            ck, soft = svm_error(runs[name], "ck", stage)
            if ntk.mean is None or ck.mean is None:
                continue
            total += 1
            near = abs(ck.mean - ntk.mean) <= CK_CLOSE
            close += near
            align = stat(runs[name], "alignment_ntk_ck", stage)
            evidence.append(
                f"{name} ({stage}): SVM error NTK {_pct(ntk.mean)}, "
                f"CK {_pct(ck.mean)}{' (soft margin)' if soft else ''}"
                f", NTK-CK alignment {align.fmt()} ({'close' if near else 'not close'})"
            )
    verdict = "not measured" if total == 0 else ("agrees" if 0 < close < total else "disagrees")
    return Claim(
        "5",
        "The conjugate kernel sometimes, but not always, approximates the NTK and the after kernel.",
        f"the CK 'approximates' the NTK when their SVM test errors differ by <= {100 * CK_CLOSE:.0f} points; agrees "
        f"if that holds for some but not all (cell, stage) pairs. Here: {close} of {total}.",
        verdict,
        evidence,
    )


def claim_learning_rate(runs: dict[str, list[dict[str, Any]]]) -> Claim:
    evidence, better, inv_hits, total, inv_total = [], 0, 0, 0, 0
    for name, ref in _lr_cells(runs):
        big, small = svm_error(runs[name], "ntk", "end")[0], svm_error(runs[ref], "ntk", "end")[0]
        if big.mean is None or small.mean is None:
            continue
        total += 1
        better += big.mean < small.mean
        parts = []
        for fam in SMALL_TRANSFORMS:
            b = stat(runs[name], "kernels", "ntk", "end", "invariance", fam)
            s = stat(runs[ref], "kernels", "ntk", "end", "invariance", fam)
            if b.mean is not None and s.mean is not None:
                inv_total += 1
                inv_hits += b.mean > s.mean
                parts.append(f"{fam} {s.fmt()} vs {b.fmt()}")
        lr = runs[name][0]["config"]["lr"]
        loss_s = stat(runs[ref], "final_train_loss")
        loss_b = stat(runs[name], "final_train_loss")
        epochs = stat(runs[name], "epochs_trained")
        reached = sum(bool(d.get("reached_target_loss")) for d in runs[name])
        evidence.append(
            f"{ref} (lr {PAPER_LR}) vs {name} (lr {lr:g}): after-kernel SVM error "
            f"{_pct(small.mean)} vs {_pct(big.mean)}"
            f"; final train loss {loss_s.fmt(1, 4)} vs {loss_b.fmt(1, 4)} after {epochs.fmt(1, 1)} epochs "
            f"(target reached in {reached}/{len(runs[name])} seeds); invariances " + "; ".join(parts)
        )
    return Claim(
        "LR",
        "Training with a larger learning rate (to the same training loss) gives a better after kernel (lower SVM "
        "test error), more invariant to small shifts, rotations and zooms.",
        "agrees if the large-lr after-kernel SVM error is lower than the lr 0.01 one for every dataset-architecture "
        f"pair, partly if for some. Here: {better} of {total} lower; invariance higher in {inv_hits} of {inv_total}.",
        _verdict(better, total),
        evidence,
    )


def judge_claims(runs: dict[str, list[dict[str, Any]]]) -> list[Claim]:
    """The paper's five claims and the learning-rate claim, each judged from the cell files."""
    return [
        claim_after_kernel_accuracy(runs),
        claim_globalness(runs),
        claim_small_invariances(runs),
        claim_augmentation(runs),
        claim_ck(runs),
        claim_learning_rate(runs),
    ]


# ------------------------------------------------------------------------------------------- tables
def _svm_cell(seeds: list[dict[str, Any]], kernel: str, stage: str) -> str:
    s, soft = svm_error(seeds, kernel, stage)
    return "n/a" if s.mean is None else s.fmt(100, 1) + (" (s)" if soft else "")


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


def invariance_table(runs: dict[str, list[dict[str, Any]]], kernel: str) -> list[str]:
    head = " | ".join(f"{f} initial | {f} end" for f in FAMILIES)
    lines = [f"| cell | {head} |", "|---|" + "---|" * (2 * len(FAMILIES))]
    for name in _ordered(runs):
        s = runs[name]
        vals = []
        for fam in FAMILIES:
            for stage in ("initial", "end"):
                vals.append(stat(s, "kernels", kernel, stage, "invariance", fam).fmt())
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return lines


def kernel_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| cell | NTK-CK alignment initial | NTK-CK alignment end | NTK eff. rank initial | NTK eff. rank end | "
        "NTK alignment end-to-initial | epochs | fit time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in _ordered(runs):
        s = runs[name]
        lines.append(
            f"| {name} | {stat(s, 'alignment_ntk_ck', 'initial').fmt()} | {stat(s, 'alignment_ntk_ck', 'end').fmt()} | "
            f"{stat(s, 'kernels', 'ntk', 'initial', 'effective_rank').fmt(1, 2)} | "
            f"{stat(s, 'kernels', 'ntk', 'end', 'effective_rank').fmt(1, 2)} | "
            f"{stat(s, 'kernels', 'ntk', 'end', 'alignment_to_initial').fmt()} | "
            f"{stat(s, 'epochs_trained').fmt(1, 1)} | {stat(s, 'timings', 'total_s').fmt(1, 0)} |"
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
        stats = [svm_error(runs[n], "ntk", stage)[0] for n in names]
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

    fig, axes = plt.subplots(1, len(FAMILIES), figsize=(4 * len(FAMILIES), 4), sharex=True, sharey=True)
    colours = plt.get_cmap("tab20").colors
    for ax, fam in zip(axes, FAMILIES, strict=True):
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
    scales = sorted({d["scale"] for seeds in runs.values() for d in seeds})
    scale_cfg = next(iter(runs.values()))[0]["config"]["scale"]
    devices = sorted({str(d["config"].get("accelerator")) for seeds in runs.values() for d in seeds})
    claims = judge_claims(runs)
    out = [
        '# Reproduction of "Properties of the After Kernel" (Long, arXiv 2105.10585)',
        "",
        f"Generated by `python -m lightning_afterkernel report {source}` from the {sum(map(len, runs.values()))} "
        f"cell files under `{source}`; do not edit by hand. Scale: **{', '.join(scales)}** "
        f"(train images {scale_cfg['train_subset'] or 'all'}, test images {scale_cfg['test_subset'] or 'all'}, "
        f"kernel SVM on {scale_cfg['n_train']} train / {scale_cfg['n_test']} test images, invariance scores on "
        f"{scale_cfg['n_invariance']} images, {scale_cfg['max_epochs']} epochs at lr {PAPER_LR}, 'a few epochs' = "
        f"{scale_cfg['few_epochs']}). Device: {', '.join(devices)}. Values are mean ± standard error over seeds "
        "(no ± with one seed).",
        "",
        "## Claims",
        "",
        "| # | paper's claim | our verdict |",
        "|---|---|---|",
    ]
    out += [f"| {c.key} | {c.paper} | **{c.verdict}** |" for c in claims]
    for c in claims:
        out += ["", f"### Claim {c.key}: {c.verdict}", "", c.paper, "", f"Rule: {c.rule}", ""]
        out += [f"- {e}" for e in c.evidence] or ["- no cells measured"]
    out += ["", "## SVM test error (%)", ""]
    out += [
        "Network: the trained network on the test images. NTK initial / after few epochs / end: hard-margin SVM on "
        "the empirical NTK (the end one is the after kernel). CK: conjugate kernel; (s) = no hard margin exists, "
        "soft-margin SVM (C = 1) error instead.",
        "",
    ]
    out += error_table(runs)
    for kernel in ("ntk", "ck"):
        out += ["", f"## Invariance scores, {kernel.upper()} (mean cosine of x and T x in kernel space)", ""]
        out += invariance_table(runs, kernel)
    out += ["", "## Kernel structure and cost", ""]
    out += kernel_table(runs)
    out += ["", "## Learning-rate study", ""]
    out += [
        "The larger-lr run trains until its epoch-mean training loss is <= the final one of the lr 0.01 run with the "
        "same seed (its 'target loss'), or until its epoch cap.",
        "",
    ]
    out += lr_table(runs) if _lr_cells(runs) else ["No learning-rate cells measured."]
    out += ["", "## Figures", ""]
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
