"""The report's claim logic and markdown on synthetic cell files (no training): one scale or several side by side,
partial scales, the evidence against epochs and the regeneration from the command the report names."""

from __future__ import annotations

import ast
import inspect
import json
import math
import re
import shlex
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from lightning_afterkernel.__main__ import run
from lightning_afterkernel.callbacks.rows import ResultRow
from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.reporting import grid
from lightning_afterkernel.reporting.evidence import ERRORS, epoch_table
from lightning_afterkernel.reporting.grid import CELL_FORMAT, SCALES, load_complete, run_grid, select_cells, summarise
from lightning_afterkernel.reporting.report import DATE_PREFIX, judge_claims, load_runs, write_report
from lightning_afterkernel.reporting.scales import load_scale
from lightning_afterkernel.reporting.stats import Stat
from lightning_afterkernel.reporting.tables import error_table, kernel_table

FAMILIES = ("globalness", "shift", "rotation", "zoom")


def kernel(err: float | None, inv: dict[str, float], soft: float | None = None, align: float = 0.9) -> dict:
    return {
        "epoch": 0,
        "svm_test_error": err,
        "svm_soft_test_error": soft,
        "svm_separable": err is not None,
        "invariance": inv,
        "effective_rank": 3.0,
        "alignment_to_initial": 0.95,
        "alignment_ntk_ck": align,
    }


def cell(
    name: str,
    seed: int = 0,
    *,
    ntk=(0.20, 0.10, 0.08),
    ck=(0.30, 0.085),
    inv_init=0.5,
    inv_end=0.6,
    glob=(0.5, 0.4),
    lr: float = 0.01,
    complete: bool = True,
    scale: str = "tiny",
) -> dict:
    dataset, arch = name.split("-")[:2]
    inv0 = {f: inv_init for f in FAMILIES} | {"globalness": glob[0]}
    inv1 = {f: inv_end for f in FAMILIES} | {"globalness": glob[1]}
    return {
        "format": CELL_FORMAT,
        "complete": complete,
        "cell": name,
        "seed": seed,
        "scale": scale,
        "config": {
            "dataset": dataset,
            "arch": arch,
            "augment": name.endswith("-aug"),
            "lr": lr,
            "scale": asdict(SCALES[scale]),
            "target_train_loss": 0.3 if lr != 0.01 else None,
            "accelerator": "cpu",
        },
        "epochs_trained": 2,
        "final_train_loss": 0.25 if lr != 0.01 else 0.3,
        "reached_target_loss": True if lr != 0.01 else None,
        "network_test_error": 0.1,
        "kernels": {
            "ntk": {
                "initial": kernel(ntk[0], inv0),
                "few": kernel(ntk[1], inv1),
                "end": kernel(ntk[2], inv1),
            },
            "ck": {"initial": kernel(None, inv0, soft=ck[0]), "few": None, "end": kernel(ck[1], inv1)},
        },
        "alignment_ntk_ck": {"initial": 0.8, "few": 0.85, "end": 0.9},
        "timings": {"total_s": 12.0},
    }


def write(root: Path, data: dict) -> Path:
    path = root / data["cell"] / f"seed{data['seed']}" / "cell.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def paper_like(root: Path, scale: str = "tiny", seeds: tuple[int, ...] = (0, 1)) -> None:
    """Cells that behave as the paper says, two seeds each."""
    for seed in seeds:
        for d in ("mnist", "cifar10"):
            for a in ("vgg", "mlp"):
                glob = (0.5, 0.4) if a == "vgg" else (0.5, 0.6)
                # the CK approximates the NTK for the VGG cells only (some but not all)
                kw = dict(glob=glob, ck=(0.30, 0.085) if a == "vgg" else (0.30, 0.25), scale=scale)
                write(root, cell(f"{d}-{a}-noaug", seed, **kw))
                write(root, cell(f"{d}-{a}-aug", seed, inv_end=0.6 + 0.001 * seed, **kw))
                write(root, cell(f"{d}-{a}-lr0.1", seed, ntk=(0.2, 0.06, 0.05), inv_end=0.7, lr=0.1, **kw))


def verdicts(root: Path) -> dict[str, str]:
    return {c.key: c.verdict for c in judge_claims(load_runs(root))}


def test_stat_mean_and_standard_error():
    s = Stat([1.0, 2.0, 3.0])
    assert s.mean == pytest.approx(2.0)
    assert s.se == pytest.approx(1.0 / 3**0.5)
    assert Stat([0.5]).se is None and Stat([0.5]).fmt() == "0.500"
    assert Stat([]).fmt() == "n/a"


def test_paper_like_results_agree_with_every_claim(tmp_path):
    paper_like(tmp_path)
    assert verdicts(tmp_path) == {k: "agrees" for k in ("1", "2", "3", "4", "5", "LR")}


def test_contrary_results_disagree(tmp_path):
    for d in ("mnist", "cifar10"):
        for a in ("vgg", "mlp"):
            # no gain from training, invariances drop, VGG less global, CK matches everywhere
            common = dict(ntk=(0.1, 0.1, 0.1), ck=(0.1, 0.1), inv_init=0.6, inv_end=0.5, glob=(0.4, 0.5))
            write(tmp_path, cell(f"{d}-{a}-noaug", **common))
            write(tmp_path, cell(f"{d}-{a}-aug", **{**common, "inv_end": 0.7}))  # augmentation helps
            write(tmp_path, cell(f"{d}-{a}-lr0.1", **{**common, "ntk": (0.1, 0.1, 0.2), "ck": (0.1, 0.2)}, lr=0.1))
    v = verdicts(tmp_path)
    assert v["1"] == "disagrees"
    assert v["2"] == "partly agrees"  # the MLP cells get less global, as the paper says; the VGG ones do not
    assert v["3"] == "partly agrees"  # the augmented cells gain invariance, the plain ones lose it
    assert v["4"] == "disagrees"
    assert v["5"] == "disagrees"  # "sometimes but not always": here always
    assert v["LR"] == "disagrees"


def test_missing_cells_are_not_measured_and_incomplete_files_are_ignored(tmp_path):
    write(tmp_path, cell("mnist-mlp-noaug"))
    write(tmp_path, cell("mnist-vgg-noaug", complete=False))
    runs = load_runs(tmp_path)
    assert list(runs) == ["mnist-mlp-noaug"]
    v = verdicts(tmp_path)
    assert v["4"] == "not measured" and v["LR"] == "not measured"
    assert load_complete(tmp_path / "mnist-vgg-noaug" / "seed0" / "cell.json") is None
    assert load_complete(tmp_path / "nothing.json") is None


def test_report_markdown_tables_claims_and_figures(tmp_path):
    paper_like(tmp_path / "runs")
    md = write_report(tmp_path / "runs", tmp_path / "docs" / "reproduction.md")
    text = md.read_text()
    for heading in (
        "## Claims",
        "### Claim 1 (tiny: agrees)",
        "### Claim 5",
        "### Claim LR",
        "## SVM test error (%)",
        "## Invariance scores, NTK",
        "## Learning-rate study",
    ):
        assert heading in text
    # mean ± standard error over the two seeds, as percentages, from the files
    assert "| mnist-vgg-noaug | 2 | 10.0 ± 0.0 | 20.0 ± 0.0 | 10.0 ± 0.0 | 8.0 ± 0.0 | 30.0 ± 0.0 (s) |" in text
    assert "| mnist-vgg-lr0.1 | 0.1 |" in text
    for name in ("reproduction_svm_error.png", "reproduction_invariance.png"):
        png = tmp_path / "docs" / "figures" / name
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert f"](figures/{name})" in text


def test_report_without_results_says_what_to_run(tmp_path):
    with pytest.raises(ConfigurationError, match="reproduce"):
        write_report(tmp_path, tmp_path / "r.md")


def test_cell_selection_adds_the_learning_rate_reference():
    names = [c.name for c in select_cells(SCALES["tiny"], ["cifar10-mlp-lr0.1"])]
    assert names == ["cifar10-mlp-noaug", "cifar10-mlp-lr0.1"]
    assert len(select_cells(SCALES["cpu"], None)) == 12
    with pytest.raises(ConfigurationError, match="mnist-mlp-noaug"):
        select_cells(SCALES["tiny"], ["mnist-mlp"])


def claims(root: Path) -> dict:
    return {c.key: c for c in judge_claims(load_runs(root))}


def test_hard_and_soft_margin_errors_are_never_averaged(tmp_path):
    # the CK at the end: seeds 0 and 2 have a hard margin, seed 1 has none (as results/cpu's mnist-mlp-lr0.1)
    for seed, (hard, soft) in enumerate([(0.054, None), (None, 0.076), (0.056, None)]):
        data = cell("mnist-mlp-noaug", seed)
        data["kernels"]["ck"]["end"] = kernel(hard, {}, soft=soft)
        write(tmp_path, data)
    row = error_table(load_runs(tmp_path))[2]
    assert row.endswith("| 30.0 ± 0.0 (s) | 5.5 ± 0.1 [2/3]; 7.6 (s) [1/3] |")  # not a mixed mean of 6.2
    (evidence,) = [e for e in claims(tmp_path)["5"].evidence if e.startswith("mnist-mlp-noaug (end)")]
    # claim 5 compares hard-margin errors over the seeds that have them, and says which seed it left out and why
    assert "NTK 8.0%, CK 5.5%," in evidence
    assert "seeds 0, 2 only: seed 1 CK has no hard margin (soft-margin error 7.6%)" in evidence


def test_a_failed_evaluation_stays_visible(tmp_path):
    ok = {"epoch": 0, "kernel": "ntk", "svm_test_acc": 0.9, "svm_soft_test_acc": math.nan, "svm_separable": 1}
    failed = dict.fromkeys(("svm_test_acc", "svm_soft_test_acc", "svm_separable", "network_test_acc"), math.nan)
    failed.update(epoch=2, kernel="ntk", error="KernelError: non-finite kernel")
    summary = summarise([ok, failed], few_epochs=1)["ntk"]
    assert summary["end"]["svm_separable"] is None  # not bool(NaN), which is True
    assert summary["initial"]["svm_separable"] is True and summary["initial"]["error"] is None
    assert summary["end"]["svm_test_error"] is None and summary["end"]["error"] == "KernelError: non-finite kernel"

    write(tmp_path, cell("mnist-mlp-noaug", 0))
    new = cell("mnist-mlp-noaug", 1)  # a cell file written by this version: the error is in the summary
    new["kernels"]["ntk"]["end"].update(
        error="KernelError: non-finite kernel",
        svm_test_error=None,
        svm_soft_test_error=None,
        svm_separable=None,
        invariance=dict.fromkeys(FAMILIES),
    )
    write(tmp_path, new)
    old = cell("mnist-mlp-noaug", 2)  # an older one: svm_separable true, the error only in its row
    old["kernels"]["ntk"]["end"].update(svm_test_error=None, svm_soft_test_error=None, svm_separable=True)
    old["rows"] = [{"kernel": "ntk", "epoch": 0, "error": "ModelError: NaN output"}]
    write(tmp_path, old)
    text = write_report(tmp_path, tmp_path / "r.md").read_text()
    assert "| mnist-mlp-noaug | 3 | 10.0 ± 0.0 | 20.0 ± 0.0 | 10.0 ± 0.0 | 8.0 [1/3]; failed [2/3] |" in text
    assert "- mnist-mlp-noaug seed 1, NTK end: KernelError: non-finite kernel" in text
    assert "- mnist-mlp-noaug seed 2, NTK end: ModelError: NaN output" in text
    assert "| 0.500 ± 0.000 | 0.600 ± 0.000 [2/3] |" in text  # the failed seed's invariance scores are counted out


def test_run_grid_refuses_a_folder_holding_another_scale(tmp_path):
    started = {
        "format": CELL_FORMAT,
        "complete": False,  # an interrupted cpu-scale run of another cell
        "cell": "cifar10-vgg-noaug",
        "seed": 0,
        "scale": "cpu",
        "config": {"scale": asdict(SCALES["cpu"])},
    }
    write(tmp_path, started)
    with pytest.raises(ConfigurationError, match=r"another scale \(scale 'cpu': 1 run.*another --out"):
        run_grid(tmp_path, "tiny", seeds=1, data_root=None, cells=["mnist-mlp-noaug"], accelerator="cpu")
    assert not (tmp_path / "mnist-mlp-noaug").exists()  # refused before anything ran

    other = tmp_path / "redefined"  # the same scale name, defined differently by another version
    data = cell("mnist-vgg-noaug")
    data["config"]["scale"]["n_train"] = 64
    write(other, data)
    with pytest.raises(ConfigurationError, match="defined by another version"):
        run_grid(other, "tiny", seeds=1, data_root=None, cells=["mnist-mlp-noaug"], accelerator="cpu")


def test_cells_scored_on_training_images_are_another_protocol_and_say_so(tmp_path):
    """Cell files from before invariance_images scored training images: the report says so, and a grid that
    would add test-image scores to their folder refuses to mix the two."""
    old = cell("mnist-mlp-noaug")
    del old["config"]["scale"]["invariance_images"]
    write(tmp_path, old)
    text = write_report(tmp_path, tmp_path / "r.md").read_text()
    assert f"| invariance scores on | {SCALES['tiny'].n_invariance} training images |" in text
    with pytest.raises(ConfigurationError, match="defined by another version"):
        run_grid(tmp_path, "tiny", seeds=1, data_root=None, cells=["mnist-vgg-noaug"], accelerator="cpu")
    new = tmp_path / "new"
    write(new, cell("mnist-mlp-noaug"))
    text = write_report(new, new / "r.md").read_text()
    assert f"| invariance scores on | {SCALES['tiny'].n_invariance} test images |" in text


def test_report_refuses_cells_of_different_scales(tmp_path):
    write(tmp_path, cell("mnist-mlp-noaug"))
    other = cell("mnist-vgg-noaug")
    other["scale"], other["config"]["scale"] = "cpu", asdict(SCALES["cpu"])
    write(tmp_path, other)
    with pytest.raises(ConfigurationError, match="different scales.*'cpu'.*'tiny'|different scales.*'tiny'.*'cpu'"):
        write_report(tmp_path, tmp_path / "r.md")


def test_a_partial_grid_says_what_was_not_run_and_noise_is_no_agreement(tmp_path):
    noise = tmp_path / "noise"
    write(noise, cell("mnist-mlp-noaug", glob=(0.404, 0.405)))
    write(noise, cell("mnist-mlp-lr0.1", ntk=(0.2, 0.1, 0.077), lr=0.1))  # 0.3 points lower than 8.0%
    c = claims(noise)
    assert c["2"].verdict == "inconclusive" and "within noise" in c["2"].evidence[0]
    assert c["LR"].verdict == "inconclusive"
    assert c["2"].coverage == "1 of 4 pairs measured; not run: CIFAR-10, VGG"

    spread = tmp_path / "spread"  # a 0.05 rise, but the seeds disagree by 0.2: within 2 standard errors
    write(spread, cell("mnist-mlp-noaug", 0, glob=(0.5, 0.45)))
    write(spread, cell("mnist-mlp-noaug", 1, glob=(0.5, 0.65)))
    assert claims(spread)["2"].verdict == "inconclusive"

    clear = tmp_path / "clear"
    write(clear, cell("mnist-mlp-noaug", glob=(0.404, 0.5)))
    write(clear, cell("cifar10-mlp-noaug", glob=(0.404, 0.5)))
    c = claims(clear)["2"]
    assert c.verdict_text == "agrees (2 of 4 pairs measured; not run: VGG)"
    text = write_report(clear, tmp_path / "r.md").read_text()
    # the two VGG cells of the claim are not run: the verdict is pending, with the rule's answer so far
    assert "| **pending**: 2 of 4 cells complete; so far agrees |" in text
    assert "### Claim 2 (tiny: pending)" in text


def test_claim_5_counts_the_shared_initial_kernel_once_per_pair(tmp_path):
    paper_like(tmp_path)  # noaug, aug and lr0.1 cells of each pair share their initial kernels
    c = claims(tmp_path)["5"]
    assert c.rule.endswith("Here: 4 of 16.")  # 4 initial comparisons (one per pair) + 12 ends
    assert sum("(initial, shared by" in e for e in c.evidence) == 4
    write(tmp_path, cell("mnist-vgg-aug", 0, ntk=(0.25, 0.1, 0.08)))  # an initial kernel that is not shared
    c = claims(tmp_path)["5"]
    assert c.rule.endswith("Here: 4 of 17.")
    assert any(e.startswith("mnist-vgg-aug (initial):") for e in c.evidence)


def test_run_time_counts_every_attempt_or_says_it_does_not(tmp_path):
    data = cell("mnist-mlp-noaug", 0)
    data["timings"] = {"total_s": 30.0, "resumed": True, "attempts": 2}  # summed over both attempts
    write(tmp_path, data)
    older = cell("mnist-mlp-noaug", 1)
    older["timings"] = {"total_s": 12.0, "resumed": True}  # an older file: only the last attempt counted
    write(tmp_path, older)
    table = kernel_table(load_runs(tmp_path))
    assert "run time (s)" in table[0]
    assert table[2].endswith("| ≥ 21 ± 9 |")


def test_the_full_scale_is_described_as_it_is():
    module = ast.parse(inspect.getsource(grid))
    (at,) = [i for i, node in enumerate(module.body) if isinstance(node, ast.AnnAssign) and node.target.id == "SCALES"]
    doc = " ".join(module.body[at + 1].value.value.split())
    full = SCALES["full"]
    assert full.train_subset is None and full.test_subset is None and (full.n_train, full.n_test) == (None, None)
    assert (full.max_epochs, full.few_epochs, full.n_invariance, full.seeds) == (10, 1, 1000, 3)
    assert "the kernel SVMs train on every training image and are tested on every test image" in doc
    assert "10 epochs at lr 0.01" in doc and "1,000 test images" in doc


@pytest.mark.parametrize(
    ("end_error", "inv_end", "verdict"),
    [
        (0.08, 0.4, "disagrees"),  # errors within noise, invariance lower: the claim's second part goes against it
        (0.05, 0.4, "partly agrees"),  # a better kernel, but less invariant
        (0.05, 0.7, "agrees"),
        (0.08, 0.6, "inconclusive"),  # both within noise
    ],
)
def test_the_learning_rate_claim_judges_both_its_parts(tmp_path, end_error, inv_end, verdict):
    """A larger learning rate gives a better after kernel AND one more invariant to small transforms: each part is
    judged, and neither alone decides."""
    for seed in (0, 1):
        write(tmp_path, cell("mnist-mlp-noaug", seed))  # lr 0.01: 8.0% error, invariance 0.6
        write(tmp_path, cell("mnist-mlp-lr0.1", seed, ntk=(0.2, 0.1, end_error), inv_end=inv_end, lr=0.1))
    claim = claims(tmp_path)["LR"]
    assert claim.verdict == verdict, claim.rule
    assert "two parts" in claim.rule


def test_the_learning_rate_claim_never_compares_a_hard_with_a_soft_margin_error(tmp_path):
    for seed in (0, 1):
        write(tmp_path, cell("mnist-mlp-noaug", seed, ntk=(0.2, 0.1, 0.05)))
        large = cell("mnist-mlp-lr0.1", seed, lr=0.1)
        large["kernels"]["ntk"]["end"] = kernel(None, {f: 0.6 for f in FAMILIES}, soft=0.02)  # no hard margin
        write(tmp_path, large)
    claim = claims(tmp_path)["LR"]
    assert claim.verdict != "agrees"  # 2.0% soft-margin vs 5.0% hard-margin error is no evidence
    (evidence,) = claim.evidence
    assert "5.0 ± 0.0% vs 2.0 ± 0.0% (soft margin) (not compared: hard vs soft margin)" in evidence
    assert "0 of 1 lower, 0 higher, 0 within noise, 1 not compared" in claim.rule


# ------------------------------------------------------------------------------------------- several scales
def contrary(root: Path, scale: str, seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    """Cells where training gains nothing (claim 1 disagrees), two seeds each unless told."""
    common = dict(ntk=(0.1, 0.1, 0.1), ck=(0.1, 0.1), inv_init=0.6, inv_end=0.5, glob=(0.4, 0.5), scale=scale)
    for seed in seeds:
        for d in ("mnist", "cifar10"):
            for a in ("vgg", "mlp"):
                write(root, cell(f"{d}-{a}-noaug", seed, **common))
                write(root, cell(f"{d}-{a}-aug", seed, **common))
                write(root, cell(f"{d}-{a}-lr0.1", seed, lr=0.1, **common))


def with_rows(data: dict, by_epoch: dict[int, tuple[float, float | None, float]]) -> dict:
    """``data`` with result rows: epoch -> (NTK SVM error, CK SVM error or None for no hard margin, network error)."""
    rows = []
    for epoch, (ntk, ck, net) in by_epoch.items():
        for kernel, err in (("ntk", ntk), ("ck", ck)):
            hard = err is not None
            row = ResultRow(epoch, 10 * epoch, kernel, network_test_acc=1 - net, svm_separable=int(hard))
            row.svm_test_acc, row.svm_soft_test_acc = (1 - err, math.nan) if hard else (math.nan, 0.75)
            row.invariance = {"globalness": 0.5 + 0.01 * epoch}
            rows.append(row.to_json())
    return data | {"rows": rows}


def claim_rows(text: str) -> dict[str, str]:
    """The headline table's rows by claim key."""
    return {line.split(" | ")[0][2:]: line for line in text.splitlines() if re.match(r"\| (\d|LR) \| ", line)}


def section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end, text.index(start))]


def test_two_scales_side_by_side_each_judged_from_its_own_cells(tmp_path):
    full, cpu = tmp_path / "full", tmp_path / "cpu"
    contrary(full, "full")
    paper_like(cpu, "cpu", seeds=(0, 1, 2))
    text = write_report([full, cpu], tmp_path / "r.md").read_text()
    assert text.index("## What was run") < text.index("## Claims")  # the first screen says what was run
    assert f"| | **full** (`{full}`) | **cpu** (`{cpu}`) |" in text
    assert "| done | 12 of 12 cells complete (36 of 36 runs) | 12 of 12 cells complete (36 of 36 runs) |" in text
    f, c = SCALES["full"], SCALES["cpu"]
    assert f"| epochs at lr 0.01 | {f.max_epochs} ('a few epochs' = 1) | {c.max_epochs} ('a few epochs' = 1) |" in text
    assert f"| kernel SVMs trained / tested on (images) | all / all | {c.n_train:,} / {c.n_test:,} |" in text
    assert "| networks trained / tested on (images) | whole splits | 2,000 / 1,000 |" in text
    assert "| kernels evaluated after epochs | 0, 1, 2, 5, 10 (lr 0.01, no augmentation)" in text

    rows = claim_rows(text)
    assert list(rows) == ["1", "2", "3", "4", "5", "LR"]  # one row per claim, a column per scale
    for (key, full_claim), cpu_claim in zip(claims(full).items(), claims(cpu).values(), strict=True):
        assert rows[key].endswith(f"| **{full_claim.verdict}** | **{cpu_claim.verdict}** |")
    assert rows["1"].endswith("| **disagrees** | **agrees** |")
    assert "### Claim 1 (full: disagrees; cpu: agrees)" in text
    assert section(text, "### Claim 1", "### Claim 2").count("Here: ") == 2  # each scale's own tally


def test_a_partial_scale_says_what_is_missing_and_its_verdicts_are_pending(tmp_path):
    full, absent = tmp_path / "full", tmp_path / "not_run"
    for seed in (0, 1):
        write(full, cell("mnist-vgg-noaug", seed, scale="full"))
    write(full, cell("mnist-vgg-noaug", 2, scale="full", complete=False))  # the grid is running it
    for seed in (0, 1, 2):
        write(full, cell("mnist-mlp-noaug", seed, scale="full"))
    scale = load_scale(full)
    assert scale.progress() == "1 of 12 cells complete (5 of 36 runs; 1 running or interrupted)"
    assert load_scale(absent).progress() == "no cell files yet"

    text = write_report([full, absent], tmp_path / "r.md").read_text()
    assert "- 2 of 3 seeds: mnist-vgg-noaug (seed 2 running or interrupted)\n" in text
    (pending,) = [line for line in text.splitlines() if line.startswith("- pending: ")]
    assert set(pending[len("- pending: ") :].split(", ")) == {c.name for c in grid.grid_cells(SCALES["full"])} - {
        "mnist-vgg-noaug",
        "mnist-mlp-noaug",
    }
    rows = claim_rows(text)
    # claim 1 reads the four no-augmentation cells: one complete, one with 2 of 3 seeds
    assert rows["1"].endswith(
        "| **pending**: 1 of 4 cells complete, 1 partly; so far agrees | **pending**: no cell files yet |"
    )
    assert rows["4"].endswith("| **pending**: 1 of 8 cells complete, 1 partly | **pending**: no cell files yet |")
    assert "| mnist-vgg-noaug | 2 of 3 | 10.0 ± 0.0 |" in text and "| mnist-mlp-noaug | 3 | " in text
    assert f"Scale: `{absent}`: no complete cell yet." in text
    assert "| done | 1 of 12 cells complete (5 of 36 runs; 1 running or interrupted) | no cell files yet |" in text


def test_no_complete_cell_in_any_folder_says_what_to_run_and_a_folder_is_named_once(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match="reproduce --out"):
        write_report([tmp_path / "empty", tmp_path / "absent"], tmp_path / "r.md")
    paper_like(tmp_path / "cpu", "cpu")
    with pytest.raises(ConfigurationError, match="named twice"):
        write_report([tmp_path / "cpu", tmp_path / "cpu" / ".." / "cpu"], tmp_path / "r.md")


def evidence_folder(root: Path, scale: str, paper: bool, seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    """Every cell (as the paper says, or contrary), with rows at epochs 0, 1, 2, 5, 10 in the no-augmentation ones:
    NTK error 10% at epoch 0 less 1 point per epoch and 0.1 point per seed; the CK has no hard margin at epoch 0
    (soft-margin error 25%) and 5% after; the network 50% less 4 points per epoch."""
    (paper_like if paper else contrary)(root, scale, seeds)
    for seed in seeds:
        for name in ("mnist-vgg-noaug", "mnist-mlp-noaug", "cifar10-vgg-noaug", "cifar10-mlp-noaug"):
            path = root / name / f"seed{seed}" / "cell.json"
            errors = {e: (0.1 - 0.01 * e - 0.001 * seed, None if e == 0 else 0.05, 0.5 - 0.04 * e) for e in EPOCHS}
            path.write_text(json.dumps(with_rows(json.loads(path.read_text()), errors)))


EPOCHS = (0, 1, 2, 5, 10)


def test_the_evidence_against_epochs_comes_from_the_rows_and_stands_beside_a_disagreeing_claim(tmp_path):
    full, cpu = tmp_path / "full", tmp_path / "cpu"
    evidence_folder(full, "full", paper=False)  # claim 1 disagrees at the full scale
    evidence_folder(cpu, "cpu", paper=True)  # and agrees at the cpu scale
    runs = load_runs(full)
    table = epoch_table(runs, ERRORS)
    assert table[0] == "| pair | measure | epoch 0 | epoch 1 | epoch 2 | epoch 5 | epoch 10 |"
    assert len(table) == 2 + 4 * len(ERRORS)  # every pair, NTK, CK and network rows
    ntk_row = table[2].split(" | ")
    assert ntk_row[:2] == ["| mnist-vgg", "NTK SVM"]
    for i, epoch in enumerate(EPOCHS):  # the rows' errors, not the cell summaries'
        expected = Stat([0.1 - 0.01 * epoch - 0.001 * seed for seed in (0, 1, 2)]).fmt(100, 1)
        assert ntk_row[2 + i].strip(" |") == expected
    assert table[3].split(" | ")[2] == "25.0 ± 0.0 (s)"  # soft-margin CK at epoch 0, marked
    assert table[4].split(" | ")[2:4] == [Stat([0.5] * 3).fmt(100, 1), Stat([0.46] * 3).fmt(100, 1)]

    text = write_report([full, cpu], tmp_path / "docs" / "r.md").read_text()
    claim1 = section(text, "### Claim 1", "### Claim 2")
    assert (
        "Evidence at the full scale: NTK SVM test error and the network's own test error (%) against epochs" in claim1
    )
    assert "Evidence at the cpu scale" not in claim1  # claim 1 agrees there
    assert f"| mnist-vgg | NTK SVM | {' | '.join(c.strip() for c in ntk_row[2:])}" in claim1
    assert "](figures/reproduction_epochs.png)" in claim1
    appendix = text[text.index("## Appendix") :]
    assert appendix.count("| pair | measure | epoch 0 |") == 2  # every pair at both scales
    assert (tmp_path / "docs" / "figures" / "reproduction_epochs.png").read_bytes()[:4] == b"\x89PNG"


def test_the_report_names_the_command_that_regenerates_it_identically(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    evidence_folder(Path("full"), "full", paper=False, seeds=(0, 1))  # partial: 2 of 3 seeds
    paper_like(Path("cpu"), "cpu", seeds=(0, 1, 2))
    run(["report", "full", "cpu", "--out", "docs/r.md"])
    assert "wrote docs/r.md" in capsys.readouterr().out
    first = Path("docs/r.md").read_text()
    figures = {p.name: p.read_bytes() for p in Path("docs/figures").glob("*.png")}
    assert len(figures) == 3
    (command,) = re.findall(r"Generated by `([^`]+)`", first)
    assert command == "python -m lightning_afterkernel report full cpu --out docs/r.md"

    shutil.rmtree("docs")
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "lightning_afterkernel", "report"]
    run(argv[3:])
    second = Path("docs/r.md").read_text()

    def undated(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith(DATE_PREFIX)]

    assert len(undated(first)) == len(first.splitlines()) - 1  # one date line
    assert undated(second) == undated(first)
    assert {p.name: p.read_bytes() for p in Path("docs/figures").glob("*.png")} == figures


def test_writing_the_report_leaves_the_matplotlib_backend_alone(tmp_path):
    """The figures are plain Figure objects: a notebook's (or a test's) backend is not switched to Agg."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        paper_like(tmp_path / "runs")
        write_report(tmp_path / "runs", tmp_path / "docs" / "reproduction.md")
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "docs" / "figures" / "reproduction_svm_error.png").stat().st_size > 0
    finally:
        matplotlib.use(before)
