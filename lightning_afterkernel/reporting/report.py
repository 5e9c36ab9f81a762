"""``report``: read the grid's ``cell.json`` files of one or more scales and write the reproduction report (markdown
+ PNG figures), the scales side by side.

Every number in the report comes from the cell files; each claim's verdict is computed at each scale separately by
the rule stated next to it (:func:`~lightning_afterkernel.reporting.claims.judge_claims`), and stays "pending" until
the cells it reads are complete. The report names the command that wrote it; rerun on the same cell files, that
command writes the same report but for its date line.
"""

from __future__ import annotations

import datetime
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_afterkernel.callbacks.rows import KERNEL_LABELS, KERNELS
from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.reporting.claims import LABELS, judge_claims, lr_cells
from lightning_afterkernel.reporting.evidence import CLAIM_EVIDENCE, ERRORS, epoch_table, evaluated_epochs
from lightning_afterkernel.reporting.figures import EPOCHS_PNG, draw_figures
from lightning_afterkernel.reporting.grid import CELL_FILENAME, DATASETS, PAPER_LR, scale_key
from lightning_afterkernel.reporting.scales import ScaleClaim, ScaleRuns, load_runs, load_scale
from lightning_afterkernel.reporting.tables import error_table, failures, invariance_table, kernel_table, lr_table

__all__ = ["DEFAULT_OUT", "judge_claims", "load_runs", "render", "report_command", "write_report"]

TITLE = '# Reproduction of "Properties of the After Kernel" (Long, arXiv 2105.10585)'
DEFAULT_OUT = "docs/reproduction.md"
DATE_PREFIX = "Date: "
"""The report's date line: the only line that differs when the report is regenerated from the same cell files."""
NOT_AGREEING = ("disagrees", "partly agrees", "inconclusive")
"""Verdicts shown beside their evidence against epochs."""
EPOCHS_FIGURE_CLAIM = "1"
"""The claim whose evidence against epochs is also shown as the errors-against-epochs figure."""


def report_command(roots: Sequence[str | Path], out: str | Path, figures_dir: str | Path | None) -> str:
    """The command line that writes this report (``--out`` only when not the default)."""
    args = ["python", "-m", "lightning_afterkernel", "report", *map(str, roots)]
    if str(out) != DEFAULT_OUT:
        args += ["--out", str(out)]
    if figures_dir is not None:
        args += ["--figures-dir", str(figures_dir)]
    return shlex.join(args)


# ------------------------------------------------------------------------------------------- what was run
def _count(n: int | None) -> str:
    return "all" if n is None else f"{n:,}"


def _kernel_images(scale: ScaleRuns) -> str:
    """The kernel SVMs' train / test images: the scale's subsets, or each dataset's whole splits as its cells say."""
    cfg = scale.config
    if cfg.get("n_train") is not None or cfg.get("n_test") is not None:
        return f"{_count(cfg.get('n_train'))} / {_count(cfg.get('n_test'))}"
    sizes = {d["config"]["dataset"]: d["config"] for seeds in scale.runs.values() for d in seeds}
    known = [(ds, sizes[ds]) for ds in DATASETS if sizes.get(ds, {}).get("n_train") is not None]
    known = [f"{_count(c['n_train'])} / {_count(c.get('n_test'))} ({LABELS[ds]})" for ds, c in known]
    return "; ".join(known) or "all / all"


def _evaluated_epochs(cfg: dict[str, Any]) -> str:
    """After which epochs the kernels are evaluated: the lr 0.01 no-augmentation cells add the evidence epochs."""
    few, last = cfg["few_epochs"], cfg["max_epochs"]
    base = sorted({0, few, last})
    evidence = sorted({*base, *(e for e in cfg.get("evidence_epochs") or [] if e < last)})
    if evidence == base:
        return f"0, {few} and the last"
    return f"{', '.join(map(str, evidence))} (lr {PAPER_LR}, no augmentation); 0, {few} and the last (the others)"


def _invariance_images(scale_cfg: dict[str, Any]) -> str:
    """Whose images a scale's invariance scores are on (cell files from before the choice: training images)."""
    return "test" if scale_key(scale_cfg)["invariance_images"] == "test" else "training"


def _scale_facts(scale: ScaleRuns) -> dict[str, str]:
    """What was run at one scale, row label -> text (from its cell files' scale definition)."""
    cfg = scale.config
    if cfg is None:
        return {"done": scale.progress()}
    nets = (
        "whole splits"
        if cfg["train_subset"] is None and cfg["test_subset"] is None
        else (f"{_count(cfg['train_subset'])} / {_count(cfg['test_subset'])}")
    )
    devices = sorted({str(d["config"].get("accelerator")) for seeds in scale.runs.values() for d in seeds})
    return {
        "done": scale.progress(),
        "networks trained / tested on (images)": nets,
        "kernel SVMs trained / tested on (images)": _kernel_images(scale),
        "invariance scores on": f"{cfg['n_invariance']:,} {_invariance_images(cfg)} images",
        f"epochs at lr {PAPER_LR}": f"{cfg['max_epochs']} ('a few epochs' = {cfg['few_epochs']})",
        "kernels evaluated after epochs": _evaluated_epochs(cfg),
        "learning-rate study": f"lr {cfg['large_lr']:g} until the lr {PAPER_LR} run's final training loss, at most "
        f"{cfg['lr_max_epochs']} epochs",
        "seeds": str(scale.expected_seeds),
        "device": ", ".join(devices) or "n/a",
    }


def _header(scale: ScaleRuns) -> str:
    return f"**{scale.label}** (`{scale.folder}`)" if scale.name else f"`{scale.folder}`"


def what_was_run(scales: list[ScaleRuns]) -> list[str]:
    """The first screen: one column per scale, then what each incomplete scale still lacks."""
    facts = [_scale_facts(s) for s in scales]
    rows = list(dict.fromkeys(k for f in facts for k in f))
    lines = ["| | " + " | ".join(map(_header, scales)) + " |", "|---|" + "---|" * len(scales)]
    lines += [f"| {row} | " + " | ".join(f.get(row, "n/a") for f in facts) + " |" for row in rows]
    for scale in scales:
        missing = scale.missing()
        if missing:
            lines += ["", f"Not yet complete at the {_header(scale)} scale:", "", *(f"- {m}" for m in missing)]
    return lines


# ------------------------------------------------------------------------------------------- claims
def _headline(judged: ScaleClaim) -> str:
    text = judged.text()
    return f"**{judged.word}**{text[len(judged.word) :]}"


def claims_table(scales: list[ScaleRuns], judged: list[list[ScaleClaim]]) -> list[str]:
    """One row per claim, one column per scale."""
    lines = ["| # | paper's claim | " + " | ".join(map(_header, scales)) + " |", "|---|---|" + "---|" * len(scales)]
    for i, claim in enumerate(judged[0]):
        verdicts = " | ".join(_headline(per_scale[i]) for per_scale in judged)
        lines.append(f"| {claim.claim.key} | {claim.claim.paper} | {verdicts} |")
    return lines


def _evidence_against_epochs(scale: ScaleRuns, judged: ScaleClaim) -> list[str]:
    """The claim's measures against epochs at this scale, where its verdict (so far) does not agree."""
    key = judged.claim.key
    if key not in CLAIM_EVIDENCE or judged.claim.verdict not in NOT_AGREEING or not evaluated_epochs(scale.runs):
        return []
    what, measures = CLAIM_EVIDENCE[key]
    return [
        "",
        f"Evidence at the {scale.label} scale: {what} against epochs, lr {PAPER_LR} without augmentation "
        "(epoch 0 = the initial kernel; n/a = not evaluated):",
        "",
        *epoch_table(scale.runs, measures),
    ]


def claim_section(scales: list[ScaleRuns], judged: list[ScaleClaim], epochs_figure: str | None) -> list[str]:
    """One claim: the paper's words, the rule, then at each scale the verdict, its tally and evidence."""
    claim = judged[0].claim
    verdicts = "; ".join(f"{s.label}: {j.word}" for s, j in zip(scales, judged, strict=True))
    lines = ["", f"### Claim {claim.key} ({verdicts})", "", claim.paper, "", f"Rule: {claim.criterion}"]
    shown = False
    for scale, j in zip(scales, judged, strict=True):
        here = f" Here: {j.claim.tally}" if j.claim.tally and scale.runs else ""
        lines += ["", f"{_header(scale)}: {j.text()}.{here}"]
        if scale.runs:
            lines += ["", *(f"- {e}" for e in j.claim.evidence)] if j.claim.evidence else ["", "- no cells measured"]
        evidence = _evidence_against_epochs(scale, j)
        lines += evidence
        shown |= bool(evidence) and claim.key == EPOCHS_FIGURE_CLAIM
    if shown and epochs_figure:
        lines += ["", f"![{Path(epochs_figure).stem}]({epochs_figure})"]
    return lines


# ------------------------------------------------------------------------------------------- tables
def _per_scale(scales: list[ScaleRuns], table: Callable[[ScaleRuns], list[str]]) -> list[str]:
    """``table(scale)`` under a line naming each scale; a scale without complete cells says so."""
    lines = []
    for scale in scales:
        if not scale.runs:
            lines += ["", f"Scale: {_header(scale)}: no complete cell yet."]
            continue
        lines += ["", f"Scale: {_header(scale)}, {scale.n_files} cell files:", "", *table(scale)]
    return lines


def _svm_tables(scale: ScaleRuns) -> list[str]:
    lines = error_table(scale.runs, scale.expected_seeds)
    failed = failures(scale.runs)
    return lines + (["", "Failed evaluations (from the cell files' `error` fields):", "", *failed] if failed else [])


def tables(scales: list[ScaleRuns]) -> list[str]:
    """The per-cell tables of every scale."""
    out = ["", "## SVM test error (%)", ""]
    out += [
        "Network: the trained network on the test images. NTK initial / after few epochs / end: hard-margin SVM on "
        "the empirical NTK (the end one is the after kernel). CK: conjugate kernel. (s) = soft-margin SVM (C = 1) "
        "error of the seeds where no hard margin exists; hard- and soft-margin errors are never averaged together: "
        "where only some seeds have a hard margin, both means are shown, each with its seed count. failed [k/N] = "
        "the evaluation failed in k seeds (listed below the table). Seeds: `2 of 3` while a cell's seeds are "
        "still running.",
    ]
    out += _per_scale(scales, _svm_tables)
    for kernel in KERNELS:
        out += ["", f"## Invariance scores, {KERNEL_LABELS[kernel]} (mean cosine of x and T x in kernel space)"]
        out += _per_scale(scales, lambda s, k=kernel: invariance_table(s.runs, k))
    out += ["", "## Kernel structure and cost", ""]
    out += [
        "Run time: wall time of a run (training, kernels, SVMs, invariance scores), summed over its attempts when an "
        "interrupted run was resumed."
    ]
    out += _per_scale(scales, lambda s: kernel_table(s.runs))
    out += ["", "## Learning-rate study", ""]
    out += [
        "The larger-lr run trains until its epoch-mean training loss is <= the final one of the lr 0.01 run with the "
        "same seed (its 'target loss'), or until its epoch cap."
    ]
    out += _per_scale(scales, lambda s: lr_table(s.runs) if lr_cells(s.runs) else ["No learning-rate cells measured."])
    return out


# ------------------------------------------------------------------------------------------- markdown
def _figure_links(paths: list[Path], md_dir: Path) -> dict[str, str]:
    """Each figure's file name -> its link from the markdown's folder."""
    return {p.name: (p.relative_to(md_dir) if p.is_relative_to(md_dir) else p).as_posix() for p in paths}


def render(scales: list[ScaleRuns], figure_paths: list[Path], md_dir: Path, command: str, date: datetime.date) -> str:
    """The markdown report of ``scales`` (each one folder of one scale), side by side in the order given."""
    judged = [[s.judge(c) for c in judge_claims(s.runs)] for s in scales]
    links = _figure_links(figure_paths, md_dir)
    epochs_figure = links.get(EPOCHS_PNG)
    out = [
        TITLE,
        "",
        f"Generated by `{command}` from the complete cell files under "
        + " and ".join(f"`{s.folder}` ({s.n_files or 'none yet'})" for s in scales)
        + "; do not edit by hand: rerun that command as cells land.",
        "",
        f"{DATE_PREFIX}{date.isoformat()} (regenerated from the same cell files, the report changes only here).",
        "",
        "## What was run",
        "",
        *what_was_run(scales),
        "",
        "Values are mean ± standard error over seeds (no ± with one seed); [n/N] = over the n of the cell's N seeds "
        "that have the value (the others failed or lack it). A verdict is pending until every seed of every cell its "
        "rule reads is complete ('so far': the rule applied to the cells complete now).",
        "",
        "## Claims",
        "",
        *claims_table(scales, judged),
    ]
    for i in range(len(judged[0])):
        out += claim_section(scales, [per_scale[i] for per_scale in judged], epochs_figure)
    out += tables(scales)
    out += ["", "## Figures", ""]
    out += ["The SVM-error figure shows the NTK's hard-margin errors (means over the seeds that have a hard margin)."]
    out += [
        line for name, link in links.items() if name != EPOCHS_PNG for line in ("", f"![{Path(name).stem}]({link})")
    ]
    out += appendix(scales, epochs_figure)
    return "\n".join(out).rstrip() + "\n"


def appendix(scales: list[ScaleRuns], epochs_figure: str | None) -> list[str]:
    """Kernel SVM and network test errors against epochs for every pair at every scale."""
    out = [
        "",
        "## Appendix: test errors against epochs",
        "",
        f"From the rows of the lr {PAPER_LR} no-augmentation cells (one per evaluated epoch and kernel): the "
        "hard-margin SVM test error (%) of the NTK and the CK (epoch 0: the initial kernels; (s): soft margin where "
        "no hard margin exists) and the network's own test error on the same test images.",
    ]
    out += _per_scale(scales, lambda s: epoch_table(s.runs, ERRORS) if evaluated_epochs(s.runs) else ["No rows yet."])
    if epochs_figure:
        out += ["", f"![{Path(epochs_figure).stem}]({epochs_figure})"]
    return out


def write_report(
    roots: str | Path | Sequence[str | Path],
    out: str | Path = DEFAULT_OUT,
    figures_dir: str | Path | None = None,
) -> Path:
    """Write the markdown report (and its figures) for the cell files under each folder of ``roots`` (one scale
    each; absent or empty folders are reported as such); returns its path."""
    roots = [roots] if isinstance(roots, str | Path) else list(roots)
    resolved = [Path(r).resolve() for r in roots]
    if len(set(resolved)) < len(resolved):
        raise ConfigurationError(f"report {' '.join(map(str, roots))}: a folder is named twice; name each scale once.")
    scales = [load_scale(r) for r in roots]
    if not any(s.runs for s in scales):
        raise ConfigurationError(
            f"no complete {CELL_FILENAME} files under {', '.join(map(str, roots))}; run `python -m "
            f"lightning_afterkernel reproduce --out {roots[0]}` first."
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig_dir = Path(figures_dir) if figures_dir is not None else out.parent / "figures"
    paths = draw_figures([(s.label, s.runs) for s in scales if s.runs], fig_dir)
    command = report_command(roots, out, figures_dir)
    out.write_text(render(scales, paths, out.parent, command, datetime.date.today()))
    return out
