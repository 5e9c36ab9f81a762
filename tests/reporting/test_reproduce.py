"""`python -m lightning_afterkernel reproduce --scale tiny` on the real data, resume, then `report`."""

from __future__ import annotations

import json
import logging

import pytest

from lightning_afterkernel.__main__ import run

pytestmark = pytest.mark.real_data

CELLS = ["mnist-mlp-noaug", "mnist-mlp-lr0.1"]


def test_tiny_grid_resumes_and_reports(tmp_path, shared_data, caplog, capsys):
    out = tmp_path / "runs"
    args = ["reproduce", "--out", str(out), "--scale", "tiny", "--data-root", str(shared_data), "--cells", *CELLS]
    run(args)
    files = {name: out / name / "seed0" / "cell.json" for name in CELLS}
    data = {name: json.loads(path.read_text()) for name, path in files.items()}
    for name, d in data.items():
        assert d["complete"] and d["cell"] == name and d["scale"] == "tiny"
        assert 0.0 <= d["network_test_error"] <= 1.0
        for k in ("ntk", "ck"):
            assert d["kernels"][k]["initial"]["epoch"] == 0 and d["kernels"][k]["end"]["epoch"] > 0
        assert set(d["kernels"]["ntk"]["end"]["invariance"]) == {"globalness", "shift", "rotation", "zoom"}
        assert d["alignment_ntk_ck"]["end"] is not None
        assert not (files[name].parent / "checkpoints").exists()  # cleaned once complete
    ref, big = data["mnist-mlp-noaug"], data["mnist-mlp-lr0.1"]
    assert ref["epochs_trained"] == 2 and len(ref["train_loss_per_epoch"]) == 2
    assert big["config"]["lr"] == 0.1 and big["config"]["target_train_loss"] == ref["final_train_loss"]
    # stopped at the first epoch whose mean training loss reached the target, or at the cap
    assert big["reached_target_loss"] == (big["final_train_loss"] <= ref["final_train_loss"])
    assert big["epochs_trained"] <= 3 and big["epochs_trained"] == len(big["train_loss_per_epoch"])

    # resume: complete cells are skipped, not refitted
    mtimes = {name: path.stat().st_mtime_ns for name, path in files.items()}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning_afterkernel.reporting"):
        run(args)
    assert {name: path.stat().st_mtime_ns for name, path in files.items()} == mtimes
    assert sum("skip" in r.getMessage() for r in caplog.records) == 2
    assert not any(r.getMessage().startswith("run ") for r in caplog.records)

    # an incomplete cell file is rerun
    files["mnist-mlp-lr0.1"].write_text(json.dumps({**big, "complete": False}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning_afterkernel.reporting"):
        run(args)
    assert any(r.getMessage().startswith("run mnist-mlp-lr0.1") for r in caplog.records)
    assert json.loads(files["mnist-mlp-lr0.1"].read_text())["complete"] is True

    md = tmp_path / "docs" / "reproduction.md"
    run(["report", str(out), "--out", str(md)])
    text = md.read_text()
    assert "## Claims" in text and "### Claim LR" in text and "| mnist-mlp-lr0.1 | 0.1 |" in text
    assert "Scale: **tiny**" in text
    assert (tmp_path / "docs" / "figures" / "reproduction_svm_error.png").exists()
    assert "wrote" in capsys.readouterr().out
