"""The report's claim logic and markdown on synthetic cell files (no training)."""

from __future__ import annotations

import ast
import inspect
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.reporting import grid
from lightning_afterkernel.reporting.grid import CELL_FORMAT, SCALES, load_complete, run_grid, select_cells, summarise
from lightning_afterkernel.reporting.report import (
    Stat,
    error_table,
    judge_claims,
    kernel_table,
    load_runs,
    write_report,
)

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
) -> dict:
    dataset, arch = name.split("-")[:2]
    inv0 = {f: inv_init for f in FAMILIES} | {"globalness": glob[0]}
    inv1 = {f: inv_end for f in FAMILIES} | {"globalness": glob[1]}
    return {
        "format": CELL_FORMAT,
        "complete": complete,
        "cell": name,
        "seed": seed,
        "scale": "tiny",
        "config": {
            "dataset": dataset,
            "arch": arch,
            "augment": name.endswith("-aug"),
            "lr": lr,
            "scale": {**SCALES["tiny"].__dict__},
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


def paper_like(root: Path) -> None:
    """Cells that behave as the paper says, two seeds each."""
    for seed in (0, 1):
        for d in ("mnist", "cifar10"):
            for a in ("vgg", "mlp"):
                glob = (0.5, 0.4) if a == "vgg" else (0.5, 0.6)
                # the CK approximates the NTK for the VGG cells only (some but not all)
                ck = (0.30, 0.085) if a == "vgg" else (0.30, 0.25)
                write(root, cell(f"{d}-{a}-noaug", seed, glob=glob, ck=ck))
                write(root, cell(f"{d}-{a}-aug", seed, glob=glob, ck=ck, inv_end=0.6 + 0.001 * seed))
                write(root, cell(f"{d}-{a}-lr0.1", seed, glob=glob, ck=ck, ntk=(0.2, 0.06, 0.05), inv_end=0.7, lr=0.1))


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
        "### Claim 1: agrees",
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
    assert f"invariance scores on {SCALES['tiny'].n_invariance} training images" in text
    with pytest.raises(ConfigurationError, match="defined by another version"):
        run_grid(tmp_path, "tiny", seeds=1, data_root=None, cells=["mnist-vgg-noaug"], accelerator="cpu")
    new = tmp_path / "new"
    write(new, cell("mnist-mlp-noaug"))
    text = write_report(new, new / "r.md").read_text()
    assert f"invariance scores on {SCALES['tiny'].n_invariance} test images" in text


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
    assert "| **agrees** (2 of 4 pairs measured; not run: VGG) |" in text
    assert "### Claim 2: agrees (2 of 4 pairs measured; not run: VGG)" in text


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
